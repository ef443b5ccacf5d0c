"""Running a search: the one entry point that picks the super-network trainer (plain labels, or the
soft-label datasets of ``--distill``, mnv4.nas.soft_labels) for a :class:`~mnv4.nas.search.SearchConfig`
(docs/nas.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.utils.data import Subset

from ..data.images import require_readable
from ..errors import InvalidValue
from ..train.checkpoint import LAST
from .report import SearchResult
from .search import SearchConfig, SearchStopped, SuperNetTrainer, _check_reachable, _cost_model, _split
from .soft_labels import SoftLabelSuperNetTrainer, soft_label_bundle
from .space import get_space

if TYPE_CHECKING:
    from ..data.datasets import DataBundle

__all__ = ["search"]


def search(
    cfg: SearchConfig,
    resume: bool = False,
    data: DataBundle | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    exist_ok: bool = False,
) -> SearchResult | SearchStopped:
    """Run (or, with ``resume``, continue) a search; under torchrun every process calls this with the
    same ``cfg``. Returns :class:`SearchStopped` when ``max_steps`` or a stop request ended it early
    (resumable). ``exist_ok``: start in an ``output`` that holds a run, replacing it (as ``mnv4 train``)."""
    from ..data.datasets import DataBundle, load_data
    from ..train.distributed import setup

    cfg = cfg.validated()
    get_space(cfg.space)  # a bad space fails before any data is read
    out = Path(cfg.output) if cfg.output else None
    if resume and out is None:
        raise InvalidValue("output", None, "name the folder of the search to resume")
    info = setup(cfg.device)
    if data is None:
        if info.is_main:
            data = load_data(cfg.data, None, 0.2, cfg.seed)
        if info.distributed:
            dist.barrier()
        if data is None:
            data = load_data(cfg.data, None, 0.2, cfg.seed)
    require_readable(lambda i: data.train[i][0], len(data.train), "training")  # before judging the target
    w_idx, r_idx = _split(len(data.train), cfg.reward_split, cfg.seed)
    split = DataBundle(
        data.name, Subset(data.train, w_idx), Subset(data.train, r_idx), list(data.class_names), data.input_size
    )
    res = cfg.resolution or data.input_size or 224
    trainer_class = SuperNetTrainer
    if cfg.distill:
        trainer_class = SoftLabelSuperNetTrainer
        data = soft_label_bundle(cfg, split)[0]  # the soft labels' classes set the network's outputs
    cost_model = _cost_model(cfg, res, len(data.class_names), info, progress, log)
    _check_reachable(cfg, cost_model)
    trainer = trainer_class(cfg, split, cost_model, progress, log)
    trainer.exist_ok = exist_ok
    return trainer.run(resume=out / LAST if resume else None, max_steps=max_steps)
