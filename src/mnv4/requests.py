"""Request fields that carry their own help: the one home of a command's defaults and choices.

A request (:class:`mnv4.deploy.requests.ExportRequest`, :class:`~mnv4.deploy.requests.BenchRequest`,
:class:`mnv4.perf.latency.LatencyProtocol`) is a frozen dataclass. A field declared with :func:`option`
becomes a command-line flag (:func:`mnv4.cli.args.add_request_flags`) whose type, default, choices
and help are read from the field, so the library and the CLI cannot disagree about any of them.
Nothing here imports torch: the CLI builds its parser from these records at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, field
from typing import Any

__all__ = ["option"]


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    kind: type | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A request field that is also a flag.

    ``kind``: the type the flag parses (default: the default's type; ``tuple`` = a comma list,
    ``bool`` = an on/off switch); ``flag``: its spelling (default ``--field-name``); ``choices``: the
    only values allowed. A field without a default is a required flag.
    """
    meta = {"help": help, "kind": kind, "flag": flag, "choices": tuple(choices) if choices else None}
    meta["metavar"] = metavar
    return field(default=default, metadata=meta)
