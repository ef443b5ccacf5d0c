"""``push_to_hub``: a training run, checkpoint or model as a Hugging Face Hub repository.

The repository holds ``config.json`` and ``model.safetensors`` in the layout timm reads
(:mod:`mnv4.weights.hub_config`), a generated model card (:mod:`mnv4.hub.card`) and, for a custom
spec, ``spec.json``. ``local_dir`` writes that folder instead of uploading it, which is also how
the tests run offline.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MNv4Error, missing_extra
from ..files import atomic_write, atomic_write_json, atomic_write_text
from ..weights.hub_config import hub_config, hub_state_dict, timm_architecture
from .card import HUB_DATASETS, CardFacts, model_card

__all__ = ["push_to_hub", "write_repo", "load_source", "Source"]

_REPO_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_RUN_SUMMARY = "summary.json"


@dataclass
class Source:
    """What is pushed: the model, and the run it came from when there is one."""

    model: nn.Module
    summary: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None


def _read_run(run: Path) -> Source:
    import yaml

    from ..factory import create_model

    try:
        summary = json.loads((run / _RUN_SUMMARY).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MNv4Error(f"cannot read {run / _RUN_SUMMARY} ({e}); is {run} a finished `mnv4 train` run?") from None
    best = Path(summary.get("best_checkpoint") or "")
    if not best.is_file():  # the run folder was moved since: its own copy
        best = run / "best.safetensors"
    if not best.is_file():
        raise MNv4Error(f"{run} has no best.safetensors; push a checkpoint file instead")
    cfg_file = run / "config.yaml"
    train_config = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
    return Source(create_model(checkpoint=best), summary, train_config if isinstance(train_config, dict) else None)


def load_source(source: str | os.PathLike | nn.Module) -> Source:
    """A model from an ``mnv4 train`` run folder (its best weights, summary and config), a checkpoint
    file or hub-layout folder, or a model object."""
    if isinstance(source, nn.Module):
        if not hasattr(source, "spec") or getattr(source, "features_only", False):
            raise MNv4Error("push an mnv4 classification model (from mnv4.create_model), not a features_only view")
        return Source(source)
    path = Path(source)
    if not path.exists():
        raise MNv4Error(f"{path} does not exist; pass a training run folder or a checkpoint")
    _refuse_detectors(path)
    if path.is_dir() and (path / "spec.json").is_file() and not (path / _RUN_SUMMARY).exists():
        raise MNv4Error(
            f"{path} is an `mnv4 search` result, not a trained model; train its architecture with "
            f"`mnv4 train --spec {path / 'spec.json'} ...`, then push that run"
        )
    if path.is_dir() and (path / _RUN_SUMMARY).exists():
        return _read_run(path)
    if path.is_dir() and (path / "config.yaml").exists():
        if (path / "best.safetensors").is_file():
            raise MNv4Error(f"{path} is a run that has not finished (no {_RUN_SUMMARY}); push its best.safetensors")
        raise MNv4Error(
            f"{path} is a run that has not finished and holds no weights yet (no best.safetensors); "
            f"continue it with `mnv4 train --resume {path}`"
        )
    from ..factory import create_model

    return Source(create_model(checkpoint=path))


def _refuse_detectors(path: Path) -> None:
    """Hub sharing is for classifiers (the model card, timm loading); a detector gets one clear line."""
    from ..detect.io import is_detector_config
    from ..weights.io import read_checkpoint

    if path.is_dir():
        try:
            task = json.loads((path / _RUN_SUMMARY).read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            task = None  # no summary, or one _read_run will report
        file = path / "best.safetensors"
        if task != "detection" and not (file.is_file() and (path / "config.yaml").is_file()):
            return
    else:
        file = path
    if file.is_file() and file.suffix == ".safetensors":
        try:
            _, cfg = read_checkpoint(file)
        except MNv4Error:
            return  # not readable as a checkpoint: the classifier path reports it
        if is_detector_config(cfg):
            raise MNv4Error(
                f"{path} holds a detector; `mnv4 hub push` shares classifiers only (share the detector's "
                ".safetensors file as it is: `mnv4 detect eval|predict --checkpoint` and `load_detector` read it)"
            )


def _facts(src: Source, repo_id: str, license: str, dataset: str | None) -> CardFacts:
    from ..models.registry import get_entry

    model = src.model
    timm_arch = timm_architecture(model)
    cfg = src.train_config or {}
    base = None
    if cfg.get("pretrained") and isinstance(cfg.get("model"), str):  # the timm weights the run started from
        tag = None if cfg["pretrained"] == "default" else cfg["pretrained"]
        try:
            base = get_entry(cfg["model"]).get_tag(tag).hub_id
        except MNv4Error:  # a tag no longer registered: the card just omits base_model
            base = None
    data = (src.summary or {}).get("dataset") or cfg.get("data")
    return CardFacts(
        repo_id=repo_id,
        architecture=timm_arch or model.spec.name,
        library="timm" if timm_arch else "mnv4",
        license=license,
        summary=src.summary,
        train_config=src.train_config,
        dataset_id=dataset or HUB_DATASETS.get(str(data)),
        base_model=base,
    )


_REPO_FILES = ("model.safetensors", "config.json", "spec.json", "README.md")  # what write_repo writes


def _check_local_dir(folder: Path) -> None:
    """``local_dir`` is empty (or new), or an earlier push's folder (only the repository files, its
    config.json one that mnv4 wrote), which is then updated; any other content is never overwritten."""
    if not folder.is_dir():
        return
    if (folder / _RUN_SUMMARY).exists():
        raise MNv4Error(f"`local_dir` {folder} holds a training run; pick an empty folder for the repository")
    names = sorted(p.name for p in folder.iterdir())
    others = [n for n in names if n not in _REPO_FILES]
    ours = False
    if "config.json" in names:
        try:
            ours = isinstance(json.loads((folder / "config.json").read_text()).get("mnv4"), dict)
        except (OSError, ValueError, AttributeError):
            ours = False
    if others or (names and not ours):
        shown = ", ".join((others or names)[:4])
        raise MNv4Error(
            f"`local_dir` {folder} already holds files that are not an mnv4 repository folder ({shown}); "
            "pick an empty folder (an earlier push's folder is updated in place)"
        )


def write_repo(src: Source, folder: str | os.PathLike, facts: CardFacts) -> Path:
    """Write the repository's files into ``folder`` (each atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model = src.model
    tensors = {k: v.detach().contiguous().cpu() for k, v in hub_state_dict(model).items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(folder / "config.json", hub_config(model, license=facts.license))
    if timm_architecture(model) is None:
        atomic_write_json(folder / "spec.json", model.spec.to_dict())
    atomic_write_text(folder / "README.md", model_card(facts, model))
    return folder


def _upload(folder: Path, repo_id: str, private: bool, token: str | None, message: str) -> str:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    api = HfApi(token=token, library_name="mnv4")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo, "repo_id", repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except Exception as e:  # auth, network, quota: one line naming the repository
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MNv4Error(
            f"could not upload to the Hugging Face hub repository {repo_id} ({type(e).__name__}: {first}); "
            "log in with `hf auth login` (or pass a token) and check the repository id, "
            "or write the folder with `local_dir` and upload it later"
        ) from None
    return f"https://huggingface.co/{repo_id}"


def push_to_hub(
    source: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
    license: str = "apache-2.0",
    dataset: str | None = None,
    commit_message: str = "Add MobileNetV4 model (mnv4)",
) -> str:
    """Publish a model as a Hugging Face Hub repository (``config.json``, ``model.safetensors``, model card).

    Args:
        source: an ``mnv4 train`` run folder (its best weights; the card gets the run's metrics, recipe
            and reproducing command), a checkpoint file or hub-layout folder, or a model.
        repo_id: ``OWNER/NAME`` (or ``NAME`` under the logged-in user).
        private: create the repository private.
        local_dir: write the repository folder here and upload nothing.
        token: a Hub token; default: the one ``hf auth login`` stored.
        license: the licence named in the card and ``config.json`` (a Hub licence id).
        dataset: a Hub dataset id for the card (default: known for cifar10 and fashion-mnist).
        commit_message: the upload's commit message.

    Returns:
        The repository URL, or ``local_dir`` when nothing was uploaded.
    """
    if not _REPO_ID.match(repo_id):
        raise MNv4Error(f"`repo_id` {repo_id!r} is not a Hub repository id; write OWNER/NAME (letters, digits, . _ -)")
    if local_dir is not None:
        _check_local_dir(Path(local_dir))  # before loading anything
    src = load_source(source)
    facts = _facts(src, repo_id, license, dataset)
    if local_dir is not None:
        return str(write_repo(src, Path(local_dir), facts))
    with tempfile.TemporaryDirectory(prefix="mnv4-hub-") as tmp:
        write_repo(src, tmp, facts)
        return _upload(Path(tmp), repo_id, private, token, commit_message)
