"""The CLI: tables, conversion, prediction, and one-line errors without tracebacks."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import mnv4
from mnv4.cli import main

from .conftest import randomize_


def test_models_table(capsys):
    assert main(["models", "conv_small"]) == 0
    out = capsys.readouterr().out
    assert "mnv4_conv_small " in out and "3.77M" in out and " 0.186 " in out and "224" in out
    assert "mnv4_conv_medium" not in out


def test_profile_per_layer(capsys):
    assert main(["profile", "mnv4_hybrid_medium", "--res", "256", "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "stages.2.4.attn.core" in out and "attention" in out
    assert "11,074,648 params, 1.271 GMACs" in out


def _photo(path, size=(40, 30), mode="RGB"):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).convert(mode).save(path)


def test_convert_timm_then_predict(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    ref = randomize_(timm.create_model("mobilenetv4_conv_small"))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    assert main(["convert", str(tmp_path / "timm.safetensors"), str(tmp_path / "ours.safetensors")]) == 0
    assert "mnv4_conv_small, 1000 classes" in capsys.readouterr().out
    images = tmp_path / "imgs"
    images.mkdir()
    _photo(images / "a.jpg")
    _photo(images / "b.png", mode="L")  # greyscale is converted
    (images / "notes.txt").write_text("not an image")
    assert main(["predict", str(images), "--checkpoint", str(tmp_path / "ours.safetensors"), "--res", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(images / "a.jpg"))
    assert lines[0].count(",") == 4  # top-5 with ImageNet names


def test_predict_uses_checkpoint_class_names(tmp_path, capsys):
    model = mnv4.create_model("mnv4_conv_small_035", num_classes=2)
    model.class_names = ["cat", "dog"]
    mnv4.save_model(model, tmp_path / "m.safetensors")
    _photo(tmp_path / "x.jpg")
    assert main(["predict", str(tmp_path / "x.jpg"), "--checkpoint", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "cat" in out and "dog" in out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["profile", "mnv4_nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnv4: error: unknown model 'mnv4_nope'") and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(mnv4.MNv4Error):
        main(["--debug", "profile", "mnv4_nope"])


def test_console_script_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "mnv4.cli", "predict", str(bad), "--checkpoint", str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("mnv4: error:")


def test_every_command_that_runs_a_model_takes_threads():
    """docs/cli.md's flag table: every command that runs a network takes ``--threads`` (the ones that only read
    tables or move files are listed here by name, so a new command must decide)."""
    import argparse

    from mnv4.cli import build_parser

    no_compute = {"models", "recipes", "roofline predict", "roofline sweep", "hub push"}

    def leaves(parser, path=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(path), parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, (*path, name))

    missing = [
        name
        for name, parser in leaves(build_parser())
        if name not in no_compute and not any("--threads" in a.option_strings for a in parser._actions)
    ]
    assert not missing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--checkpoint", "x.safetensors", "--seed", "-1"], "--seed: expected an integer >= 0"),
        (["detect", "eval", "--checkpoint", "x.safetensors", "--seed", "-1"], "--seed: expected an integer >= 0"),
        (["train", "--logger", "foo"], "--logger 'foo' is invalid"),
        (["roofline", "sweep", "-m", "mnv4_conv_small", "--max-ridge", "inf"], "expected a number > 0, got 'inf'"),
    ],
)
def test_shared_flags_are_checked_alike_and_named(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_reader_that_leaves_early_is_no_error():
    """`mnv4 models -v | head -1`: the pipe closes; the command stops quietly with 141, as Unix tools do. The
    reader here leaves before the first byte, so the closed pipe is certain (`| head` may read it all first)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnv4.cli", "models", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
    piped = subprocess.run(
        f"{sys.executable} -m mnv4.cli models -v | head -1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert piped.stdout.startswith("model") and piped.stderr == ""
