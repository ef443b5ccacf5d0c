"""The ``mnv4`` command: a thin shell over the library API.

Each command group is a module of this package with a ``register(subparsers)`` function; command
functions import the library (and torch) only when they run, so ``mnv4 --help`` answers at once.
Flags follow one vocabulary (:mod:`mnv4.cli.args`). Errors print one line (``mnv4: error: ...``)
with the library's field names rewritten to the command's flags; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence

from ..errors import MNv4Error
from .args import Formatter, check_outputs, render_message

__all__ = ["main", "build_parser"]

# Command groups, in the order `mnv4 --help` lists them.
_COMMAND_MODULES = (
    "mnv4.cli.models",
    "mnv4.cli.train",
    "mnv4.cli.distill",
    "mnv4.cli.search",
    "mnv4.cli.deploy",
    "mnv4.cli.quantize",
    "mnv4.cli.hub",
    "mnv4.cli.detect",
)


def _version() -> str:
    from .. import __version__

    return __version__


def common_parser() -> argparse.ArgumentParser:
    """--debug and --version, accepted before or after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p.add_argument("--version", action="version", version=f"mnv4 {_version()}")
    return p


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``mnv4 train: error: ...``), like the rest of the CLI."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class _Subparsers:
    """Wraps argparse's subparsers so every command gets the common flags and the help formatter."""

    def __init__(self, action: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
        self.action, self.common = action, common

    def add_parser(self, name: str, **kw) -> argparse.ArgumentParser:
        kw.setdefault("formatter_class", Formatter)
        kw.setdefault("description", kw.get("help"))
        kw["parents"] = [*kw.get("parents", []), self.common]
        p = self.action.add_parser(name, **kw)
        p.set_defaults(_parser=p)
        return p

    def add_group(self, name: str, **kw) -> _Subparsers:
        """A command with subcommands of its own (``mnv4 roofline predict|sweep|calibrate``)."""
        p = self.add_parser(name, **kw)
        sub = p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", parser_class=Parser)
        sub.required = True
        return _Subparsers(sub, self.common)


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = Parser(
        prog="mnv4",
        description="MobileNetV4 models, weights, training, distillation, search and deployment",
        parents=[common],
        formatter_class=Formatter,
    )
    # Not set_defaults(debug=...): the --debug action object is shared with every subparser.
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    wrapped = _Subparsers(sub, common)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(wrapped)
    return parser


# Old spellings of subcommand groups, rewritten before parsing (kept for one release).
_GROUPS = {"roofline": ("predict", "sweep", "calibrate"), "distill": ("label",)}


def _rewrite_legacy(argv: list[str]) -> list[str]:
    """``mnv4 roofline [MODELS] [--sweep]`` -> ``mnv4 roofline predict|sweep ...``."""
    for i, tok in enumerate(argv):
        if tok.startswith("-"):
            continue
        if tok == "roofline":
            rest = argv[i + 1 :]
            if rest and (rest[0] in _GROUPS["roofline"] or rest[0] in ("-h", "--help")):
                return argv
            if "--sweep" in rest:
                rest = [t for t in rest if t != "--sweep"]
                return [*argv[: i + 1], "sweep", *rest]
            return [*argv[: i + 1], "predict", *rest]
        return argv
    return argv


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1:2`` -> ``--flag=-1:2``: argparse takes a value starting with '-' for an option unless it is a
    plain number, and would answer "expected one argument" instead of what is wrong with the value."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-[\d.][\d.:eE+-]*", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"mnv4: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show


# Converters and runtimes that log progress and advice at INFO/WARNING level or through C++ glog:
# their chatter buries the command's one-line results, so it is shown only with --debug.
_CHATTY_MODULES = r"(nncf|executorch|coremltools|ai_edge_litert|ai_edge_torch|tensorflow|absl|onnxscript|openvino)"
_CHATTY_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


@contextlib.contextmanager
def quiet_third_party(debug: bool) -> Iterator[None]:
    """Silence third-party logging (Python ``logging`` below ERROR, TF/absl C++ logs, the chatty
    libraries' warnings) for one command, unless ``debug``; everything is restored afterwards.
    mnv4 itself reports through print and ``warnings``, so its own lines are unaffected."""
    if debug:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _CHATTY_ENV}
    for k, v in _CHATTY_ENV.items():
        os.environ.setdefault(k, v)
    logging.disable(logging.WARNING)  # global: libraries reset their own loggers' levels at import
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_CHATTY_MODULES)
            yield
    finally:
        logging.disable(logging.NOTSET)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def process_threads(args: argparse.Namespace) -> Iterator[None]:
    """The command's ``--threads`` as this process's torch thread count (commands whose flag says so,
    see :func:`mnv4.cli.args.add_threads`), restored afterwards."""
    n = getattr(args, "threads", None) if getattr(args, "_process_threads", False) else None
    if n is None:
        yield
        return
    from ..threads import torch_threads

    with torch_threads(n):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    argv = _attach_negative_values(_rewrite_legacy(list(sys.argv[1:] if argv is None else argv)))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2, already printed)
        return int(e.code or 0)
    args.debug = getattr(args, "debug", False)
    _one_line_warnings()
    sub = getattr(args, "_parser", parser)
    try:
        check_outputs(args)  # every command's output paths, before its work
        with quiet_third_party(args.debug), process_threads(args):
            result = args.func(args)
    except MNv4Error as e:
        if args.debug:
            raise
        msg = render_message(str(e), sub, getattr(args, "_field_fallback", None))
        print(f"mnv4: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("mnv4: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mnv4 models -v | head -1`: the reader left; stop quietly, as Unix tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as e:  # anything unexpected still gets one line unless --debug
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"mnv4: error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)
