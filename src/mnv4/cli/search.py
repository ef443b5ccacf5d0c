"""``mnv4 search``: the paper's two-stage TuNAS over the UIB space, for a latency or MAC target."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MNv4Error
from . import args as A

__all__ = ["register"]

# Flags that map straight onto SearchConfig fields: (flags, field, type, help).
_FIELD_FLAGS: tuple[tuple[tuple[str, ...], str, Any, str], ...] = (
    (("--epochs",), "epochs", float, "super-network epochs over the training data, both stages together"),
    (("--lr",), "lr", float, "peak LR of the shared weights (AdamW, warm-up + cosine)"),
    (("--micro-batch",), "micro_batch", int, "per-process batch that fits in memory; the rest is accumulated"),
    (("--beta",), "beta", float, "cost weight of the reward Q + beta*|T/T0 - 1| (negative)"),
    (("--controller-lr",), "controller_lr", float, "Adam LR of the controller (default: 15 / its updates)"),
    (("--coarse-fraction",), "coarse_fraction", float, "share of the steps the coarse (filters, depth) stage gets"),
    (("--rl-warmup",), "rl_warmup", float, "fraction of each stage before the controller starts learning"),
    (("--reward-split",), "reward_split", float, "held-out fraction of the training data the reward uses"),
    (("--cost-tolerance",), "cost_tolerance", float, "accepted relative distance of the result from the target"),
    (("--eval-subnets",), "eval_subnets", int, "sub-networks of each kind evaluated for the scatter plot"),
    (("--seed",), "seed", int, "seed of weights, data order, augmentation and architecture samples"),
    (("--save-every-steps",), "save_every_steps", int, "checkpoint every N steps (and at epoch ends)"),
    (("--latency-table",), "latency_table", str, "file caching the measured latency table (--hardware local)"),
)


def _config(args: argparse.Namespace):
    from ..nas.search import SearchConfig

    fields: dict[str, Any] = {f: getattr(args, f) for _, f, _, _ in _FIELD_FLAGS if getattr(args, f) is not None}
    fields.update(
        data=args.data,
        output=args.output,
        space=args.space,
        hardware=args.hardware,
        target_ms=args.target_ms,
        target_macs=args.target_macs,
        target_like=args.target_like,
        resolution=args.input_size,
        one_stage=args.one_stage,
        fine_expand=args.fine_expand,
        distill=tuple(args.distill or ()),
        mix=args.mix,
    )
    for field in ("batch_size", "threads", "workers", "device"):
        if getattr(args, field) is not None:
            fields[field] = getattr(args, field)
    if fields["data"] is None:
        raise MNv4Error("`data` is required: an image folder, cifar10 or digits")
    if fields["output"] is None:
        from ..train.runs import default_run_dir

        fields["output"] = str(default_run_dir(f"search-{_label(args.data)}"))
    return SearchConfig(**fields)


def _label(data: str) -> str:
    from pathlib import Path

    return Path(str(data).rstrip("/")).name or "data"


def _resume_config(args: argparse.Namespace):
    from ..nas.search import RESUME_MAY_CHANGE, SearchConfig
    from ..train.checkpoint import load_training_state
    from ..train.runs import checkpoint_file, resumed_fields

    path = checkpoint_file(args.resume)
    saved = load_training_state(path).get("extra", {}).get("search_config")
    if saved is None:
        raise MNv4Error(f"{path} is not a search checkpoint; resume training runs with `mnv4 train --resume`")
    requested = {field: getattr(args, field, None) for field in RESUME_MAY_CHANGE}
    return SearchConfig.from_dict({**resumed_fields(saved, requested, RESUME_MAY_CHANGE), "output": str(path.parent)})


def _cmd_search(args: argparse.Namespace) -> int:
    from ..nas.space import get_space

    if args.show_space:
        print(get_space(args.space).describe())
        return 0
    from ..nas.run import search
    from ..nas.search import SearchStopped
    from ..train.distributed import teardown
    from ..train.runs import exit_code

    cfg = _resume_config(args) if args.resume else _config(args)
    try:
        result = search(
            cfg,
            resume=bool(args.resume),
            max_steps=args.max_steps,
            progress=False if args.no_progress else None,
        )
    finally:
        teardown()
    if isinstance(result, SearchStopped):  # the search said where and why it stopped
        return exit_code(result.stop_reason)
    r = result.report
    if not r:  # a non-zero rank under torchrun
        return 0
    if not r["within_tolerance"]:
        print(
            f"mnv4: error: the architecture found costs {r['cost']:.4g} {r['unit']}, "
            f"{100 * r['cost_error']:+.1f}% from the target {r['target']:.4g} (--cost-tolerance "
            f"{cfg.cost_tolerance:g}); its spec and report are in {result.output}. Search again with a stronger "
            "cost weight (--beta) or more --epochs",
            file=sys.stderr,
        )
        return 3
    print(
        f"cost {r['cost']:.4g} {r['unit']} for target {r['target']:.4g} ({100 * r['cost_error']:+.1f}%), "
        f"measured here {r['measured_here_ms']:.3f} ms; {r['wall_seconds'] / 60:.1f} min"
    )
    print(f"spec: {result.output / 'spec.json'}  (report: {result.output / 'report.md'})")
    print(f"next: mnv4 train --spec {result.output / 'spec.json'} --data {cfg.data}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "search",
        help="NAS: two-stage TuNAS over UIB blocks for a latency / MAC target; writes a buildable spec.json",
        description=(
            "Trains a weight-sharing super-network and a REINFORCE controller (paper Sec. 6.1, docs/nas.md): "
            "a coarse stage searches widths and depths with IB blocks, a fine stage the UIB depthwise choices. "
            "Writes OUTPUT/spec.json (for `mnv4 train --spec`, `mnv4 export --spec`, `mnv4 profile --spec`), "
            "report.md/json, curves.png and scatter.png. Exit code 3: the result misses --cost-tolerance."
        ),
    )
    p.add_argument("--data", default=None, help="PATH to an image folder, or cifar10 | digits")
    p.add_argument(
        "--hardware",
        default="pixel8_edgetpu",
        metavar="HW",
        help="cost model: pixel8_edgetpu | pixel6_cpu | s23_cpu | pixel4_dsp (roofline), local (a latency "
        "table measured here), macs, or a PROFILE.yaml from `mnv4 roofline calibrate`",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-ms", type=A.positive_float, default=None, metavar="MS", help="latency target")
    target.add_argument("--target-macs", type=A.positive_float, default=None, metavar="M", help="millions of MACs")
    target.add_argument(
        "--target-like", default=None, metavar="MODEL", help="the cost of a registered model, e.g. mnv4_conv_small"
    )
    p.add_argument("--space", default="s", help="search space: s | m | l | m_hybrid | a .json/.yaml file")
    p.add_argument("--show-space", action="store_true", help="print the search space's choices and exit")
    p.add_argument("--one-stage", action="store_true", help="search all decisions jointly (paper Tab. 4 ablation)")
    p.add_argument(
        "--fine-expand", action="store_true", help="the fine stage also searches expansions (paper: fixed at 4)"
    )
    A.add_soft_labels(p, "the super-network")
    A.add_input_size(p, help="search resolution (default: the dataset's own, else 224)")
    A.add_batch_size(p, None, help="super-network batch (default 64)")
    A.add_output(p, help="result folder (default: runs/search-DATA, suffixed -2, -3... when taken)")
    A.add_device(p, default=None)
    A.add_workers(p, default=None)
    p.add_argument(
        "--threads", type=A.positive_int, default=None, metavar="N", help="CPU threads of latency measurements (1)"
    )
    for flags, field, typ, text in _FIELD_FLAGS:
        p.add_argument(*flags, dest=field, type=typ, default=None, help=text)
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the search saved in DIR")
    p.add_argument("--max-steps", type=A.positive_int, default=None, help="stop after N steps, resumable from there")
    A.add_progress(p)
    p.set_defaults(func=_cmd_search)
