"""``mnv4 search``: the paper's two-stage TuNAS over the UIB space, for a latency or MAC target."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import MNv4Error
from ..nas.requests import RESUME_MAY_CHANGE, SearchConfig
from . import args as A

__all__ = ["register"]


def _config(args: argparse.Namespace) -> SearchConfig:
    if args.data is None:
        raise MNv4Error("`data` is required: an image folder, cifar10 or digits")
    output = args.output
    if output is None:
        from ..train.runs import default_run_dir

        output = str(default_run_dir(f"search-{_label(args.data)}"))
    # flags left out are None: the config's defaults apply
    return A.request_from_args(
        SearchConfig,
        args,
        given_only=True,
        output=output,
        resolution=args.input_size,
        distill=tuple(args.distill or ()),
    )


def _label(data: str) -> str:
    from pathlib import Path

    return Path(str(data).rstrip("/")).name or "data"


def _resume_config(args: argparse.Namespace):
    from ..train.checkpoint import load_training_state
    from ..train.runs import check_resume_output, checkpoint_file, resumed_fields

    path = checkpoint_file(args.resume)
    check_resume_output(args.output, path)
    saved = load_training_state(path).get("extra", {}).get("search_config")
    if saved is None:
        raise MNv4Error(f"{path} is not a search checkpoint; resume training runs with `mnv4 train --resume`")
    # every setting given on the command line: those a resume may change are taken, any other that differs
    # from the saved search is refused by name (as `mnv4 train --resume`), never silently dropped
    requested = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig) if hasattr(args, f.name)}
    requested.update(resolution=args.input_size, distill=tuple(args.distill) if args.distill else None)
    return SearchConfig.from_dict({**resumed_fields(saved, requested, RESUME_MAY_CHANGE), "output": str(path.parent)})


def _cmd_search(args: argparse.Namespace) -> int:
    from ..nas.space import get_space

    if args.show_space:
        print(get_space(args.space or SearchConfig.space).describe())
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
            exist_ok=args.exist_ok,
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
    targets = ("target_ms", "target_macs", "target_like")
    A.add_request_flags(p.add_mutually_exclusive_group(), SearchConfig, only=targets, given_only=True)
    flags = [f.name for f in dataclasses.fields(SearchConfig) if f.name not in targets]
    A.add_request_flags(p, SearchConfig, only=flags, given_only=True)
    p.add_argument("--show-space", action="store_true", help="print the search space's choices and exit")
    A.add_soft_labels(p, "the super-network")
    A.add_input_size(p, help="search resolution (default: the dataset's own, else 224)")
    A.add_batch_size(p, None, help=f"super-network batch (default {SearchConfig.batch_size})")
    A.add_output(p, help="result folder (default: runs/search-DATA, suffixed -2, -3... when taken)", kind="folder")
    A.add_device(p, default=None)
    A.add_workers(p, default=None)
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the search saved in DIR")
    p.add_argument("--max-steps", type=A.positive_int, default=None, help="stop after N steps, resumable from there")
    p.add_argument("--exist-ok", action="store_true", help="start a new search in --output even if it holds one")
    A.add_progress(p)
    p.set_defaults(func=_cmd_search)
