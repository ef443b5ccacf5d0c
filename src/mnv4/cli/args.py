"""The command line's shared vocabulary: one flag per idea, the same in every command.

| idea               | flag                        | hidden aliases (kept for one release)      |
|--------------------|-----------------------------|--------------------------------------------|
| model              | ``--model/-m NAME``         | a positional model name                    |
| weights file       | ``--checkpoint PATH``       |                                            |
| published weights  | ``--pretrained [TAG]``      |                                            |
| resolution         | ``--input-size N``          | ``--res``, ``--img-size``                  |
| batch size         | ``--batch-size/-b N``       | ``--batch``                                |
| output             | ``--output/-o PATH``        | ``--out``, ``--output-dir``                |
| device             | ``--device``                |                                            |
| threads            | ``--threads N``             |                                            |
| data loader procs  | ``--workers/-j N``          |                                            |
| progress bars      | ``--no-progress``           |                                            |

Every command module calls these helpers instead of spelling flags itself; the README's table is
this one. Nothing here imports torch: ``mnv4 --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from ..errors import MAX_INPUT_SIZE, MIN_INPUT_SIZE

__all__ = [
    "Formatter",
    "add_model",
    "add_models",
    "add_weights",
    "add_input_size",
    "add_batch_size",
    "add_output",
    "add_device",
    "add_threads",
    "add_workers",
    "add_progress",
    "add_hidden_alias",
    "print_table",
    "render_message",
    "positive_int",
    "nonneg_int",
    "positive_float",
    "model_list",
    "add_request_flags",
    "request_from_args",
]


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default; keeps hand-wrapped descriptions and epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Defaults of None / False say nothing useful ("default: None"); leave them out.
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return super()._get_help_string(action)


def add_hidden_alias(parser: argparse.ArgumentParser, *flags: str, dest: str, **kw: Any) -> None:
    """Old spellings of a flag: accepted, not shown in --help, never overriding the canonical default."""
    parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def _number(kind: type, lo: float, name: str, hi: float = float("inf")):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < lo or value != value or value == float("inf") or value > hi:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_int = _number(int, 1, "an integer >= 1")
nonneg_int = _number(int, 0, "an integer >= 0")
positive_float = _number(float, 1e-300, "a number > 0")
# Every command's --input-size, in the library's one range (mnv4.errors.MIN_INPUT_SIZE / MAX_INPUT_SIZE).
# --threads: a thread pool far beyond any machine's cores fails inside the OpenMP runtime (100000 crashed the
# process), so the flag stops at MAX_THREADS like --workers at 256.
MAX_THREADS = 1024
threads_int = _number(int, 1, f"an integer from 1 to {MAX_THREADS}", MAX_THREADS)
input_size_int = _number(int, MIN_INPUT_SIZE, f"an integer from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}", MAX_INPUT_SIZE)


def model_list(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def add_model(
    parser: argparse.ArgumentParser, required: bool = False, help: str | None = None, positional: bool = True
) -> None:
    """``--model/-m NAME`` (plus the old positional form, hidden). Result in ``args.model``."""
    parser.add_argument(
        "-m",
        "--model",
        default=None,
        required=required,
        help=help or "architecture, e.g. mnv4_conv_small or mnv4_conv_small.e2400_r224_in1k (see `mnv4 models`)",
    )
    if positional:
        parser.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help=argparse.SUPPRESS)


def read_spec(path: str) -> dict:
    """A spec file (JSON of ``ModelSpec.to_dict``, e.g. written by ``mnv4 search``) as a model field."""
    from ..models.specs import read_spec_file

    return read_spec_file(path).to_dict()


def add_spec(parser: argparse.ArgumentParser) -> None:
    """``--spec FILE``: an architecture from a spec JSON (``mnv4 search`` writes one), instead of ``--model``."""
    parser.add_argument("--spec", default=None, metavar="FILE", help="architecture from a spec JSON (e.g. mnv4 search)")


def add_models(parser: argparse.ArgumentParser, help: str) -> None:
    """Several models: ``--model a --model b`` or ``--model a,b`` (and old positionals). ``args.models``."""
    parser.add_argument("-m", "--model", dest="models", action="extend", type=model_list, default=None, help=help)
    parser.add_argument("models_pos", nargs="*", default=[], metavar="MODEL", help=argparse.SUPPRESS)


def resolve_models(args: argparse.Namespace) -> list[str]:
    return list(args.models or []) + list(getattr(args, "models_pos", []) or [])


def resolve_model(args: argparse.Namespace) -> str | None:
    pos = getattr(args, "model_pos", None)
    if pos and args.model and pos != args.model:
        from ..errors import MNv4Error

        raise MNv4Error(f"two models given ({pos} and --model {args.model}); pass one")
    return args.model or pos


def add_weights(parser: argparse.ArgumentParser, pretrained: bool = True, checkpoint_help: str | None = None) -> None:
    """``--checkpoint PATH`` and ``--pretrained [TAG]`` (timm weights; no TAG = the default tag)."""
    parser.add_argument("--checkpoint", default=None, help=checkpoint_help or "weights file (mnv4 or timm format)")
    if pretrained:
        parser.add_argument(
            "--pretrained",
            nargs="?",
            const=True,
            default=None,
            metavar="TAG",
            help="published timm weights (default tag, or TAG; `mnv4 models -v` lists them)",
        )


def add_input_size(parser: argparse.ArgumentParser, help: str | None = None, dest: str = "input_size") -> None:
    parser.add_argument(
        "--input-size",
        dest=dest,
        type=input_size_int,
        default=None,
        metavar="N",
        help=help or "input resolution in pixels (default: the weights' own)",
    )
    add_hidden_alias(parser, "--res", "--img-size", "--imgsz", dest=dest, type=input_size_int)


def add_batch_size(parser: argparse.ArgumentParser, default: int | None, help: str = "images per batch") -> None:
    parser.add_argument("-b", "--batch-size", type=positive_int, default=default, metavar="N", help=help)
    add_hidden_alias(parser, "--batch", dest="batch_size", type=positive_int)


def add_output(parser: argparse.ArgumentParser, help: str, default: str | None = None, kind: str | None = None) -> None:
    """``-o/--output PATH``. ``kind`` ("file" or "folder"): what the command writes there, checked before
    the command runs (:func:`declare_outputs`); None where the command decides (export: a file or a folder)."""
    parser.add_argument("-o", "--output", default=default, metavar="PATH", help=help)
    add_hidden_alias(parser, "--out", "--output-dir", dest="output")
    if kind is not None:
        declare_outputs(parser, output=kind)


def declare_outputs(parser: argparse.ArgumentParser, **kinds: str) -> None:
    """Mark flags (by dest) as paths the command writes, each a "file" or a "folder": :func:`check_outputs`
    refuses an impossible one (a file where a folder goes, a folder under a file, no write permission)
    before any work, in one place for every command, instead of an OSError after minutes of it."""
    merged = {**(parser.get_default("_outputs") or {}), **kinds}
    parser.set_defaults(_outputs=merged)


def check_outputs(args: argparse.Namespace) -> None:
    from ..files import check_output_path

    for dest, kind in (getattr(args, "_outputs", None) or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            check_output_path(value, dest, folder=kind == "folder")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help="auto | cpu | cuda | cuda:N")


def add_threads(
    parser: argparse.ArgumentParser, default: int | None = None, help: str | None = None, process: bool = True
) -> None:
    """``--threads N``. ``process``: the command runs with this process's torch intra-op pool at N threads
    (:func:`mnv4.cli.main` applies it around the command with :func:`mnv4.threads.torch_threads`);
    otherwise the command hands N on itself (to a runtime, or to measurement processes)."""
    parser.add_argument(
        "--threads",
        type=threads_int,
        default=default,
        metavar="N",
        help=help or "CPU threads of this process (default: torch's choice)",
    )
    parser.set_defaults(_process_threads=process)


def add_workers(parser: argparse.ArgumentParser, default: int | None = 0) -> None:
    parser.add_argument("-j", "--workers", type=nonneg_int, default=default, metavar="N", help="data-loading processes")


def add_loggers(parser: argparse.ArgumentParser) -> None:
    """``--logger tensorboard,wandb,mlflow``: experiment trackers of a training run (``args.logger``)."""
    parser.add_argument(
        "--logger",
        type=lambda text: tuple(t for t in model_list(text) if t != "none"),
        default=None,
        metavar="NAMES",
        help="experiment trackers, comma-separated: tensorboard, wandb, mlflow, or none "
        "(default: tensorboard when installed; W&B and MLflow follow their WANDB_* / MLFLOW_* settings)",
    )


def add_soft_labels(parser: argparse.ArgumentParser, trains: str) -> None:
    """``--distill DIR`` (repeatable) and ``--mix``: soft-label folders that ``trains`` learns from."""
    parser.add_argument(
        "--distill",
        action="append",
        metavar="DIR",
        help=f"soft-label folder from `mnv4 distill label` that {trains} learns from (repeat to mix several)",
    )
    parser.add_argument("--mix", default=None, metavar="R1:R2:...", help="shares of the --distill folders per batch")


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they only show on a terminal anyway)"
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """Left-aligned columns with a dashed rule under the header (the CLI's table style)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = file or sys.stdout
    print(line.format(*header).rstrip(), file=out)
    print(line.format(*("-" * w for w in widths)), file=out)
    for row in rows:
        print(line.format(*row).rstrip(), file=out)


_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


# Library fields whose flag has another dest: TrainConfig.loggers <- --logger, SearchConfig.resolution <-
# --input-size.
_FIELD_ALIASES = {"loggers": "logger", "resolution": "input_size"}


def render_message(message: str, parser: argparse.ArgumentParser | None, fallback: str | None = None) -> str:
    """Rewrite the library's `field` names into this command's flags (``--batch-size``).

    A field without a flag of its own becomes ``fallback.format(field)`` when given (``--set field``
    for train), else its plain name.
    """
    flags: dict[str, str] = {}
    if parser is not None:
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if longs and action.help != argparse.SUPPRESS and action.dest not in flags:
                flags[action.dest] = longs[0]

    def sub(m: re.Match) -> str:
        field = m.group(1)
        field = field if field in flags else _FIELD_ALIASES.get(field, field)
        if field in flags:
            return flags[field]
        return fallback.format(field) if fallback else field

    return _FIELD.sub(sub, message)


_R = TypeVar("_R")


def _comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(model_list(text))


_METAVARS = {int: "N", float: "X", _comma_tuple: "LIST"}


def add_request_flags(
    parser: argparse.ArgumentParser,
    request: type,
    only: Iterable[str] | None = None,
    defaults: Any = None,
    given_only: bool = False,
) -> None:
    """One flag per field of the ``request`` dataclass declared with :func:`mnv4.requests.option`, its
    spelling, type, default, choices and help read from the field (so the CLI restates none of them).

    ``only`` limits the flags to those fields; ``defaults`` (an instance of ``request``) takes the
    defaults from it instead of from the class (``mnv4 roofline calibrate`` times with fewer runs).
    ``given_only``: every flag defaults to None and its help names the field's default, for a command
    that must tell a flag given from one left out (``mnv4 search --resume`` changes only what was given;
    build the request with ``request_from_args(..., given_only=True)``).
    """
    only = None if only is None else set(only)
    for f in dataclasses.fields(request):
        meta = f.metadata
        if "help" not in meta or (only is not None and f.name not in only):
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        kind = meta["kind"] or type(default)
        if f.default is dataclasses.MISSING:  # required whatever ``defaults`` holds in its place
            kw["required"] = not given_only
            kind = meta["kind"] or str
        elif given_only:
            kw["default"] = None
            if default not in (None, False):
                kw["help"] += f" (default: {','.join(default) if isinstance(default, tuple) else default})"
        else:
            kw["default"] = default
        if kind is bool:
            kw.update(action="store_const", const=True)
        else:
            if kind is tuple:
                kind = _comma_tuple
                if isinstance(default, tuple):  # argparse parses string defaults: help shows "fp32,int8"
                    kw["default"] = ",".join(default)
            metavar = meta["metavar"] or (None if meta["choices"] else _METAVARS.get(kind))
            kw.update(type=kind, choices=meta["choices"], metavar=metavar)
        parser.add_argument(flag, **kw)


def request_from_args(request: type[_R], args: argparse.Namespace, given_only: bool = False, **given: Any) -> _R:
    """The ``request`` made of the parsed flags that share its fields' names, plus ``given``.
    ``given_only``: flags left out (None) are left out, so the request's defaults apply."""
    names = {f.name for f in dataclasses.fields(request)}  # type: ignore[arg-type]
    fields = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if given_only:
        fields = {n: v for n, v in fields.items() if v is not None}
    fields.update(given)
    return request(**fields)
