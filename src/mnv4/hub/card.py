"""The model card (``README.md``) of a hub repository: YAML front matter the Hub indexes, then what
the run measured, how it was trained, the command that reproduces it, how to load it, its licence."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any

import yaml
from torch import nn

__all__ = ["CardFacts", "model_card", "train_command"]

# Built-in training sets (mnv4.data.datasets) that have a Hub dataset id for the front matter.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "fashion-mnist": "zalando-datasets/fashion_mnist"}
# Config fields that say where or how fast a run went, not what it learnt: left out of the command.
_LOCAL_FIELDS = {
    "output", "data_root", "workers", "device", "save_every_steps", "eval_every", "channels_last", "compile", "name",
    "note", "recipe", "loggers",
}  # fmt: skip
_FLAGS = {
    "data": "--data", "epochs": "--epochs", "batch_size": "--batch-size", "input_size": "--input-size", "lr": "--lr",
    "seed": "--seed", "checkpoint": "--checkpoint", "val_split": "--val-split", "precision": "--precision",
}  # fmt: skip


@dataclass
class CardFacts:
    """What the card says about one model: its repository, the run behind it (if any), its licence."""

    repo_id: str
    architecture: str  # the config.json architecture (timm's name where timm has it)
    library: str  # "timm" when timm loads it, else "mnv4"
    license: str = "apache-2.0"
    summary: dict[str, Any] | None = None  # summary.json of the `mnv4 train` run
    train_config: dict[str, Any] | None = None  # config.yaml of that run
    dataset_id: str | None = None  # Hub dataset id for the front matter
    base_model: str | None = None  # Hub id of the weights the run started from


def _value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def train_command(train_config: dict[str, Any]) -> str:
    """``mnv4 train`` with the run's recipe and every field it changed from that recipe."""
    from ..train.config import TrainConfig
    from ..train.recipes import get_recipe

    recipe = train_config.get("recipe") or "quick"
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    defaults.update(get_recipe(recipe).to_dict())
    parts = ["mnv4", "train", "--recipe", recipe]
    model = train_config.get("model")
    if isinstance(model, dict):
        parts += ["--spec", "spec.json"]
    elif model and model != defaults.get("model"):
        parts += ["-m", str(model)]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in train_config.items():
        if key not in fields or key == "model" or key in _LOCAL_FIELDS or value is None or value == () or value == []:
            continue
        if key in defaults and _same(defaults[key], value):
            continue
        if key == "pretrained":
            parts += ["--pretrained"] if value == "default" else ["--pretrained", str(value)]
        elif key in _FLAGS:
            parts += [_FLAGS[key], _value(value)]
        else:
            parts += ["--set", f"{key}={_value(value)}"]
    return " ".join(shlex.quote(p) for p in parts)


def _same(a: Any, b: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, list | tuple) else v  # noqa: E731 - YAML gives lists, recipes tuples
    return norm(a) == norm(b)


def _front_matter(facts: CardFacts) -> str:
    tags = ["image-classification", "mobilenetv4", "mnv4"] + (["timm"] if facts.library == "timm" else [])
    meta: dict[str, Any] = {
        "library_name": facts.library,
        "license": facts.license,
        "tags": tags,
        "pipeline_tag": "image-classification",
    }
    if facts.dataset_id:
        meta["datasets"] = [facts.dataset_id]
    meta["metrics"] = ["accuracy"]
    if facts.base_model:
        meta["base_model"] = facts.base_model
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _results(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return ["No `mnv4 train` run came with these weights, so nothing was measured for this card."]
    rows = [
        ("val top-1 (best epoch)", summary.get("val_top1"), "%"),
        ("val top-1 (final)", summary.get("val_top1_final"), "%"),
        ("val top-5 (final)", summary.get("val_top5_final"), "%"),
        ("val loss (final)", summary.get("val_loss_final"), ""),
    ]
    out = [f"Measured by `mnv4 train` on the validation split of {summary.get('dataset', '?')}:", ""]
    out += ["| metric | value |", "|---|---|"]
    out += [f"| {name} | {value:.2f}{unit} |" for name, value, unit in rows if isinstance(value, int | float)]
    best = summary.get("best_weights")
    out += [
        "",
        f"The weights are the {best + ' ' if best else ''}weights of epoch {summary.get('best_epoch', '?')} of "
        f"{summary.get('epochs', '?')} ({summary.get('steps', '?')} optimizer steps, "
        f"{summary.get('wall_seconds', 0):.0f} s).",
    ]
    return out


def _training(facts: CardFacts, model: nn.Module) -> list[str]:
    cfg, summary = facts.train_config or {}, facts.summary or {}
    if not cfg and not summary:
        return []
    start = cfg.get("checkpoint") or (f"timm weights ({cfg['pretrained']})" if cfg.get("pretrained") else "scratch")
    rows = [
        ("recipe", cfg.get("recipe")),
        ("data", summary.get("dataset") or cfg.get("data")),
        ("classes", summary.get("num_classes") or model.num_classes),
        ("input size", summary.get("input_size") or cfg.get("input_size")),
        ("epochs", cfg.get("epochs")),
        ("batch size", cfg.get("batch_size")),
        ("peak LR (at the recipe's batch)", cfg.get("lr")),
        ("weight decay", cfg.get("weight_decay")),
        ("started from", start),
    ]
    out = ["## Training", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if cfg:
        spec_note = " (`spec.json` is in this repository)" if isinstance(cfg.get("model"), dict) else ""
        out += ["", f"Reproduce it with mnv4{spec_note}:", "", "```bash", train_command(cfg), "```"]
    return out + [""]


def _usage(facts: CardFacts) -> list[str]:
    out = ["## Use", "", "```python", "import mnv4", "", f'model = mnv4.create_model("hf-hub:{facts.repo_id}").eval()']
    out += ["print(model.class_names, model.preprocess)", "```"]
    if facts.library == "timm":
        out += ["", "or with timm (the weights are in timm's layout):", "", "```python", "import timm", ""]
        out += [f'model = timm.create_model("hf-hub:{facts.repo_id}", pretrained=True).eval()', "```"]
    return out + [""]


def model_card(facts: CardFacts, model: nn.Module) -> str:
    """The whole ``README.md``."""
    name = facts.repo_id.split("/")[-1]
    lines = [
        f"# {name}",
        "",
        f"A MobileNetV4 image classifier (`{facts.architecture}`, {model.num_classes} classes, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) published with "
        "mnv4, a PyTorch implementation of MobileNetV4 (Qin et al., arXiv 2404.10518).",
        "",
        "## Results",
        "",
        *_results(facts.summary),
        "",
        *_training(facts, model),
        *_usage(facts),
        "## Licence",
        "",
        f"{facts.license}. Check that the licence of the training data allows the use you have in mind.",
        "",
    ]
    return _front_matter(facts) + "\n" + "\n".join(lines)
