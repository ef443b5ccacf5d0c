"""Requests are the one home of a command's defaults and choices: the CLI's flags are generated from
their fields, so parsing no flags gives the library's defaults, and a choice list exists once."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mnv4.cli import args as A
from mnv4.deploy.formats import FORMATS, PRECISIONS
from mnv4.deploy.requests import BenchRequest, ExportRequest
from mnv4.perf.latency import PAPER_PROTOCOL, LatencyProtocol, measure_latency


def _subcommand(argv: list[str]) -> argparse.Namespace:
    from mnv4.cli import build_parser

    return build_parser().parse_args(argv)


def test_no_flags_give_the_library_defaults():
    args = _subcommand(["export", "-m", "mnv4_conv_small", "--format", "onnx"])
    assert A.request_from_args(ExportRequest, args) == ExportRequest("onnx")
    args = _subcommand(["bench", "-m", "mnv4_conv_small"])
    protocol = A.request_from_args(LatencyProtocol, args)
    assert protocol == LatencyProtocol() == PAPER_PROTOCOL
    assert A.request_from_args(BenchRequest, args, models=("mnv4_conv_small",), protocol=protocol) == BenchRequest(
        ("mnv4_conv_small",)
    )
    # the protocol's numbers, spelt out once: what the paper asks for (Appendix B)
    assert (PAPER_PROTOCOL.runs, PAPER_PROTOCOL.repeats, PAPER_PROTOCOL.warmup, PAPER_PROTOCOL.budget_s) == (
        1000,
        5,
        20,
        3.0,
    )
    defaults = {k: v.default for k, v in __import__("inspect").signature(measure_latency).parameters.items()}
    assert {k: defaults[k] for k in ("runs", "repeats", "warmup", "budget_s")} == dataclasses.asdict(PAPER_PROTOCOL)


def test_flags_parse_into_the_request():
    args = _subcommand(
        ["export", "-m", "x", "--format", "litert", "--int8", "--calib", "d", "--samples", "4", "--recalibrate-bn"]
    )
    req = A.request_from_args(ExportRequest, args)
    assert (req.format, req.precision, req.calib_dir, req.samples, req.recalibrate_bn) == (
        "litert",
        "int8",
        "d",
        4,
        True,
    )
    args = _subcommand(["bench", "--precisions", "fp32,int8", "--runtimes", "torch", "--runs", "7", "--budget", "0"])
    assert args.precisions == ("fp32", "int8") and args.runtimes == ("torch",) and args.runs == 7
    assert args.budget_s == 0.0


def test_choices_come_from_the_records(capsys):
    with pytest.raises(SystemExit):
        _subcommand(["export", "-m", "x", "--format", "tflite"])
    err = capsys.readouterr().err
    assert f"choose from {', '.join(repr(f) for f in FORMATS)}" in err
    with pytest.raises(SystemExit):
        _subcommand(["export", "-m", "x", "--format", "onnx", "--precision", "fp64"])
    assert f"choose from {', '.join(repr(p) for p in PRECISIONS)}" in capsys.readouterr().err


def test_calibrate_takes_its_own_protocol_defaults():
    from mnv4.deploy.roofline_fit import CALIBRATION_PROTOCOL

    args = _subcommand(["roofline", "calibrate"])
    assert (args.runs, args.repeats) == (CALIBRATION_PROTOCOL.runs, CALIBRATION_PROTOCOL.repeats) == (100, 3)


def test_add_request_flags_on_a_toy_request():
    from mnv4.requests import option

    @dataclasses.dataclass(frozen=True)
    class Toy:
        name: str = option(help="required", choices=("a", "b"))
        sizes: tuple[str, ...] = option(("x", "y"), "comma list")
        limit: float | None = option(None, "optional", kind=float, flag="--cap")
        on: bool = option(False, "switch")
        hidden: int = 3  # no option(): not a flag

    p = argparse.ArgumentParser()
    A.add_request_flags(p, Toy)
    assert A.request_from_args(Toy, p.parse_args(["--name", "a"])) == Toy("a")
    got = A.request_from_args(Toy, p.parse_args(["--name", "b", "--sizes", "p, q", "--cap", "2.5", "--on"]))
    assert got == Toy("b", ("p", "q"), 2.5, True)
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "a", "--hidden", "4"])


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "digits"],
        ["distill", "finetune", "--teacher", "t", "--data", "d"],
        ["profile", "mnv4_conv_small"],
        ["plot", "runs/x"],
        ["convert", "a.pth", "b.safetensors"],
        ["predict", "img.png"],
        ["eval"],
        ["distill", "label", "--teacher", "t", "--data", "d"],
    ],
)
def test_threads_is_one_flag_that_sets_this_process(argv):
    args = _subcommand([*argv, "--threads", "3"])
    assert args.threads == 3 and args._process_threads is True


def test_threads_apply_to_the_command_and_are_restored(monkeypatch, capsys):
    import torch

    import mnv4.cli.models as cli_models
    from mnv4.cli import main

    seen = []
    monkeypatch.setattr(cli_models, "_cmd_profile", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert main(["profile", "mnv4_conv_small", "--threads", str(target)]) == 0
    assert seen == [target] and torch.get_num_threads() == before
    # export hands its --threads to the runtime instead: this process's pool is left alone
    assert _subcommand(["export", "-m", "x", "--format", "onnx", "--threads", "3"])._process_threads is False


def _flag_actions(argv: list[str]) -> dict[str, argparse.Action]:
    """The actions of the sub-command ``argv`` names, by destination."""
    from mnv4.cli import build_parser

    parser = build_parser()
    for name in argv:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.dest: a for a in reversed(parser._actions)}  # the first of a destination, not its hidden aliases


def test_distill_label_flags_are_the_label_config_fields():
    from mnv4.distill import augment, engines
    from mnv4.distill.policies import POLICIES
    from mnv4.distill.requests import ENGINES, LABEL_COMMAND, LabelConfig

    actions = _flag_actions(["distill", "label"])
    flagged = [f for f in dataclasses.fields(LabelConfig) if "help" in f.metadata]
    assert len(flagged) >= 14
    for f in flagged:  # the command's default is the config's (the command's record: engine differs, below)
        required = f.default is dataclasses.MISSING
        assert actions[f.name].required == required, f.name
        assert required or actions[f.name].default == getattr(LABEL_COMMAND, f.name), f.name
        assert actions[f.name].help == f.metadata["help"], f.name
    for name in ("batch_size", "workers", "device"):  # the shared -b / -j / --device flags take the command's too
        assert actions[name].default == getattr(LABEL_COMMAND, name), name
    assert {f.name for f in flagged if f.default is dataclasses.MISSING} == {"teacher", "data"}
    # the library labels eagerly and in-process unless asked; the command takes the fastest route that passes
    # the parity gate and makes records in a worker process
    assert dataclasses.replace(LABEL_COMMAND, engine="eager", workers=0) == LabelConfig("", "", "")
    assert (LABEL_COMMAND.engine, LABEL_COMMAND.workers) == ("auto", 1)
    # one table each: the choices are the policy table's names and the engines the runner knows
    assert actions["aug"].choices == tuple(POLICIES) == tuple(augment.POLICIES)
    assert augment.POLICIES is POLICIES and engines.ENGINES is ENGINES and actions["engine"].choices == ENGINES
    argv = ["--teacher", "t", "--data", "d", "-o", "o", "--aug", "none", "--top-k", "5"]
    args = _subcommand(["distill", "label", *argv])
    cfg = A.request_from_args(LabelConfig, args, out=args.output)
    assert cfg == dataclasses.replace(LABEL_COMMAND, teacher="t", data="d", out="o", aug="none", top_k=5)


def test_distill_finetune_frozen_flags_are_the_frozen_config_fields():
    from mnv4.distill.policies import POLICIES
    from mnv4.distill.requests import FROZEN_COMMAND, FrozenConfig

    actions = _flag_actions(["distill", "finetune"])
    flagged = [f for f in dataclasses.fields(FrozenConfig) if "help" in f.metadata]
    assert {f.name for f in flagged} == {"views", "aug", "crop_min", "weight_decay", "cache", "engine"}
    for f in flagged:
        assert actions[f.name].default == getattr(FROZEN_COMMAND, f.name), f.name
    assert "--head-wd" in actions["weight_decay"].option_strings
    # extra views are fitted to their image's own label: every policy but the one that mixes two images
    assert set(actions["aug"].choices) == set(POLICIES) - {"inception-extreme-mixup"}


def test_distill_package_names_resolve_lazily():
    import subprocess
    import sys

    import mnv4.distill as d

    assert all(getattr(d, name) is not None for name in d.__all__)
    # the CLI reads the requests (distill and search) at start-up: they must not pull torch in
    code = "import sys, mnv4.distill.requests, mnv4.nas.requests; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    # no package name is also a submodule name: importing the submodule first would rebind the package's
    # attribute to the module (mnv4.distill.label must stay the function whatever was imported before)
    for package in ("mnv4.distill", "mnv4.nas", "mnv4.detect", "mnv4.deploy", "mnv4.perf", "mnv4"):
        modules = "{m.name for m in pkgutil.iter_modules(p.__path__)}"
        code = f"import pkgutil, {package} as p; print(sorted(set(p.__all__) & {modules}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == "[]", (package, out.stdout, out.stderr[-300:])


def test_search_flags_are_the_search_config_fields(tmp_path):
    from mnv4.cli.search import _config
    from mnv4.nas import SPACES
    from mnv4.nas.requests import SearchConfig

    actions = _flag_actions(["search"])
    flagged = [f for f in dataclasses.fields(SearchConfig) if "help" in f.metadata]
    assert len(flagged) >= 20
    for f in flagged:  # left out = None (a resume changes only what was given); the help names the default
        assert actions[f.name].default is None, f.name
        if f.default not in (None, False):
            assert actions[f.name].help.endswith(f"(default: {f.default})"), f.name
    # no flags: the config's own defaults
    args = _subcommand(["search", "--data", "digits", "--target-macs", "50", "-o", str(tmp_path)])
    assert _config(args) == SearchConfig("digits", output=str(tmp_path), target_macs=50.0)
    args = _subcommand(["search", "--data", "d", "--target-ms", "2", "--epochs", "3", "--one-stage", "--lr", "0.1"])
    cfg = _config(args)
    assert (cfg.epochs, cfg.one_stage, cfg.lr, cfg.target_ms, cfg.space) == (3.0, True, 0.1, 2.0, SearchConfig.space)
    # the presets are a data table under torch; the help's list must name exactly them
    listed = actions["space"].help.split("a preset, ")[1].split(" (")[0]
    assert listed.split(" | ") == list(SPACES)
