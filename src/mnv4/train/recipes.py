"""Training recipes as data: the paper's per-model hyper-parameters plus two small-data recipes.

Numbers come from docs/architecture.md §8 (paper Tab. 10 and the TF Model Garden configs). Where the two
disagree the TF configs win, because they are what reproduces the published accuracy; each recipe's
``note`` says what was chosen. Every field can be overridden (CLI flag or YAML/JSON file).

Conventions:
* ``batch_size`` is the *global effective* batch (all processes x accumulation x micro-batch).
* ``lr`` is the peak LR at ``lr_ref_batch`` (the recipe's own batch size); a run with another
  effective batch scales it by ``lr_scaling``: 'linear' (lr x batch / lr_ref_batch, the default),
  'sqrt', or 'none'.
* BatchNorm momentum is PyTorch's (1 - Keras momentum): TF's 0.997 is 0.003 here.
* ``randaug_magnitude`` is on TF's 0-10 level scale (see ``mnv4.data.transforms.train_transform``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import MNv4Error

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    note: str = ""
    model: str | dict | None = "mnv4_conv_small"  # a name, a ModelSpec dict, or None: from --checkpoint
    data: str | None = None  # default --data; None means it must be given
    input_size: int | None = None  # None: the dataset's natural size, else the model's
    epochs: float = 10
    batch_size: int = 128
    micro_batch: int | None = None  # per-process micro-batch; None = the whole per-process share
    lr: float = 1e-3
    lr_ref_batch: int | None = None  # the batch size ``lr`` is stated for; None = ``batch_size``
    lr_scaling: str = "linear"
    min_lr_ratio: float = 0.0  # cosine decay alpha: final LR as a fraction of the peak
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    l2: float = 0.0  # extra L2 on conv/linear kernels (Conv-S's Keras kernel regulariser)
    ema_decay: float = 0.0  # 0 disables EMA
    ema_start_epochs: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    label_smoothing: float = 0.1
    dropout: float = 0.0
    drop_path: float = 0.0
    drop_path_schedule: str = "tf"
    bn_momentum: float | None = None  # None keeps PyTorch's 0.1
    bn_eps: float | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    randaug_prob: float = 0.0
    randaug_layers: int = 2
    randaug_magnitude: float = 9
    mix_prob: float = 0.0
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with a NaN/inf loss
    # Layer-wise LR decay: layer i of L (model.group_matcher) trains at lr * layer_decay ** (L - 1 - i); 1 = off.
    layer_decay: float = 1.0
    # Quantization-aware training: every conv/linear fake-quantizes as INT8 (mnv4.models.fake_quant).
    fake_quant: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PAPER_COMMON = dict(
    label_smoothing=0.1,
    lr_scaling="linear",
    crop_scale=(0.08, 1.0),
    hflip=0.5,
    micro_batch=256,  # 4096/16384 never fit one device: accumulate by default
    betas=(0.9, 0.999),
    eps=1e-7,
    bn_momentum=0.003,
    bn_eps=1e-3,
    precision="bf16",
)

_MAGNITUDE_NOTE = "RandAugment magnitude 15 runs at torchvision's maximum (TF level 10)."

RECIPES: dict[str, Recipe] = {
    r.name: dataclasses.replace(r, lr_ref_batch=r.lr_ref_batch or r.batch_size)
    for r in (
        Recipe(
            **{
                **_PAPER_COMMON,
                "name": "paper-conv-small",
                "note": (
                    "Tab. 10 / TF config: ~9600 epochs at batch 4096, 224 px, fp32. TF-only: BN momentum 0.95 "
                    "(0.05 here) and eps 1e-6; EMA 0.9999 starting at step 1560 (end of warm-up); extra L2 1e-5."
                ),
                "model": "mnv4_conv_small",
                "input_size": 224,
                "epochs": 9600,
                "batch_size": 4096,
                "lr": 0.002,
                "warmup_epochs": 5,
                "weight_decay": 0.01,
                "betas": (0.6, 0.999),
                "eps": 1e-6,
                "l2": 1e-5,
                "ema_decay": 0.9999,
                "ema_start_epochs": 5,
                "dropout": 0.3,
                "drop_path": 0.0,
                "randaug_prob": 0.5,
                "randaug_magnitude": 9,
                "bn_momentum": 0.05,
                "bn_eps": 1e-6,
                "precision": "fp32",
            }
        ),
        Recipe(
            **{
                **_PAPER_COMMON,
                "name": "paper-conv-medium",
                "note": "Tab. 10 / TF config: 500 epochs at 4096, 256 px; per-block stochastic depth "
                + "(TF flat_stochastic_depth_drop_rate false); BN 0.997/1e-3 from TF. "
                + _MAGNITUDE_NOTE,
                "model": "mnv4_conv_medium",
                "input_size": 256,
                "epochs": 500,
                "batch_size": 4096,
                "lr": 0.004,
                "warmup_epochs": 5,
                "weight_decay": 0.1,
                "dropout": 0.2,
                "drop_path": 0.075,
                "drop_path_schedule": "tf",
                "randaug_prob": 0.7,
                "randaug_magnitude": 15,
            }
        ),
        Recipe(
            **{
                **_PAPER_COMMON,
                "name": "paper-hybrid-medium",
                "note": "Tab. 10 / TF config: 500 epochs at 16384, 256 px, per-block stochastic depth; warm-up is "
                + "TF's 1560 steps (~20 epochs); BN 0.997/1e-3 from TF. "
                + _MAGNITUDE_NOTE,
                "model": "mnv4_hybrid_medium",
                "input_size": 256,
                "epochs": 500,
                "batch_size": 16384,
                "lr": 0.016,
                "warmup_epochs": 20,
                "weight_decay": 0.1,
                "dropout": 0.2,
                "drop_path": 0.075,
                "drop_path_schedule": "tf",
                "randaug_prob": 0.7,
                "randaug_magnitude": 15,
            }
        ),
        Recipe(
            **{
                **_PAPER_COMMON,
                "name": "paper-conv-large",
                "note": "TF config over Tab. 10 where they disagree: stochastic depth 0.2 flat (paper: 0.35 peak) "
                + "and Mixup/CutMix probability 0.2 (paper: 0.3); 500 epochs at 16384, 384 px. "
                + _MAGNITUDE_NOTE,
                "model": "mnv4_conv_large",
                "input_size": 384,
                "epochs": 500,
                "batch_size": 16384,
                "lr": 0.004,
                "warmup_epochs": 20,
                "weight_decay": 0.2,
                "dropout": 0.2,
                "drop_path": 0.2,
                "drop_path_schedule": "flat",
                "randaug_prob": 1.0,
                "randaug_magnitude": 15,
                "mix_prob": 0.2,
            }
        ),
        Recipe(
            **{
                **_PAPER_COMMON,
                "name": "paper-hybrid-large",
                "note": "Tab. 10 / TF config: 500 epochs at 16384, 384 px, final LR 0.001 x peak, per-block "
                + "stochastic depth peak 0.35, Mixup/CutMix 0.3. "
                + _MAGNITUDE_NOTE,
                "model": "mnv4_hybrid_large",
                "input_size": 384,
                "epochs": 500,
                "batch_size": 16384,
                "lr": 0.01,
                "min_lr_ratio": 0.001,
                "warmup_epochs": 20,
                "weight_decay": 0.2,
                "dropout": 0.2,
                "drop_path": 0.35,
                "drop_path_schedule": "tf",
                "randaug_prob": 1.0,
                "randaug_magnitude": 15,
                "mix_prob": 0.3,
            }
        ),
        Recipe(
            name="finetune",
            model=None,
            note=(
                "Fine-tune pretrained weights (`checkpoint`, whose architecture is used, or `model` + "
                "`pretrained`) on a small dataset: ~10x lower LR than training from scratch, light augmentation "
                "(no Mixup/CutMix, mild RandAugment), short schedule, PyTorch's faster BN momentum so statistics "
                "adapt to the new images, and layer-wise LR decay 0.9 (earlier layers train slower)."
            ),
            epochs=15,
            batch_size=64,
            lr=2e-4,
            warmup_epochs=1,
            weight_decay=0.05,
            label_smoothing=0.1,
            dropout=0.2,
            drop_path=0.05,
            crop_scale=(0.35, 1.0),
            hflip=0.5,
            randaug_prob=0.3,
            randaug_layers=2,
            randaug_magnitude=5,
            # Earlier layers hold generic features: train them slower. 0.9 per layer puts Conv-S's stem
            # (19 layers) at 0.15x and Conv-L's (30 layers) at 0.05x the head's LR. A conservative value
            # from common fine-tuning practice, not tuned on mnv4 (docs/training.md).
            layer_decay=0.9,
        ),
        Recipe(
            name="distill",
            note=(
                "The paper's distillation student (§8, App. H): soft-label cross-entropy against stored teacher "
                "probabilities (--distill DIR ... --mix 1:1:2) or a live --teacher; flip-only augmentation (the "
                "records are augmented already), dropout before the classifier as the only regulariser, AdamW with "
                "warm-up + cosine, EMA; classes come from the teacher. The paper gives no LR, weight decay or "
                "dropout for it: these are the values of benchmarks/distill_gain.py (docs/distillation.md)."
            ),
            model="mnv4_conv_small",
            epochs=30,
            batch_size=256,
            lr=4e-3,
            lr_scaling="sqrt",
            warmup_epochs=1,
            weight_decay=0.05,
            label_smoothing=0.0,
            dropout=0.2,
            drop_path=0.0,
            crop_scale=(0.08, 1.0),  # the live teacher's Inception crop (online mode); records are cropped already
            hflip=0.5,
            randaug_prob=0.0,
            mix_prob=0.0,
            ema_decay=0.9995,
            ema_start_epochs=1,
        ),
        Recipe(
            name="qat",
            model=None,
            note=(
                "Quantization-aware fine-tuning of a trained checkpoint (`checkpoint`): every conv and linear layer "
                "trains through INT8 fake quantization (per-channel int8 weights, per-tensor uint8 inputs: the "
                "ONNX Runtime / NNCF scheme), so the weights settle where rounding costs least; then export with "
                "`--int8` as usual (the routes calibrate the activation ranges). Short, at ~1/20 of a from-scratch "
                "LR, light augmentation, no weight decay or stochastic depth (the weights should move little). "
                "The simulation quantizes the unfused conv weights; BatchNorm is folded only at export "
                "(docs/deploy.md, QAT)."
            ),
            epochs=3,
            batch_size=64,
            lr=1e-4,
            warmup_epochs=0.0,
            weight_decay=0.0,
            label_smoothing=0.1,
            dropout=0.0,
            drop_path=0.0,
            crop_scale=(0.6, 1.0),
            hflip=0.5,
            randaug_prob=0.0,
            fake_quant=True,
        ),
        Recipe(
            name="quick",
            note=(
                "The default: the built-in digits (sklearn, 32 px) in a few CPU minutes. Small batch, "
                "short cosine schedule, crops that keep most of the digit and no flips (a flipped 2 is not a 2)."
            ),
            data="digits",
            epochs=15,
            batch_size=64,
            lr=2e-3,
            warmup_epochs=1,
            weight_decay=0.05,
            label_smoothing=0.1,
            dropout=0.1,
            crop_scale=(0.6, 1.0),
            hflip=0.0,
            randaug_prob=0.0,
        ),
        Recipe(
            name="small-photos",
            note=(
                "From scratch on a few thousand small photos (CIFAR-style, 32-64 px): hard labels with flips, "
                "crops keeping at least 35% of the image, light RandAugment (half the images, 2 ops at "
                "magnitude 5) and dropout 0.2. The recipe of benchmarks/cifar_mini.py and the hard-label "
                "baseline of benchmarks/distill_gain.py and benchmarks/nas_search.py."
            ),
            epochs=40,
            batch_size=64,
            lr=2e-3,
            warmup_epochs=2,
            weight_decay=0.05,
            label_smoothing=0.1,
            dropout=0.2,
            crop_scale=(0.35, 1.0),
            hflip=0.5,
            randaug_prob=0.5,
            randaug_layers=2,
            randaug_magnitude=5,
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise MNv4Error(f"unknown recipe {name!r}; `mnv4 recipes` lists them: {', '.join(RECIPES)}") from None
