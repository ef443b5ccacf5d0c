"""Bad input, table-driven: every case exits 2 with one line that names the flag and what is allowed,
before any work is done; and the command line's shared vocabulary (aliases, --debug, --version, help)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import mnv4
from mnv4.cli import main

TRAIN_CASES = [
    (["--epochs", "-1"], "--epochs -1.0 is invalid: must be > 0"),
    (["--epochs", "0"], "--epochs 0.0 is invalid: must be > 0"),
    (["--batch-size", "0"], "argument -b/--batch-size: expected an integer >= 1, got '0'"),
    (["--input-size", "0"], "argument --input-size: expected an integer from 16 to 2048, got '0'"),
    (["--input-size", "30000"], "argument --input-size: expected an integer from 16 to 2048, got '30000'"),
    (["--micro-batch", "0"], "--micro-batch 0 is invalid: must be >= 1"),
    (["--grad-clip", "-1"], "--grad-clip -1.0 is invalid: must be >= 0"),
    (["--set", "drop_path=-1"], "--set drop_path -1 is invalid: must be >= 0 and < 1"),
    (["--set", "mix_prob=2"], "--set mix_prob 2 is invalid: must be >= 0 and <= 1"),
    (["--val-split", "1.5"], "--val-split 1.5 is invalid: must be > 0 and < 1"),
    (["--device", "banana"], "--device 'banana' is invalid: choose auto, cpu, cuda, cuda:N or mps"),
    (["--set", "epochs=abc"], "--epochs 'abc' is invalid: must be a number"),
    (["--lr", "inf"], "--lr inf is invalid: must be finite"),
    (["--lr", "nan"], "--lr nan is invalid: must be finite"),
    (["--precision", "fp64"], "--precision 'fp64' is invalid: choose one of fp32, bf16, fp16"),
    (["--set", "warmup_epoch=1"], "unknown config field(s): warmup_epoch (did you mean warmup_epochs?)"),
    (["--set", "betas=[0.9]"], "--set betas [0.9] is invalid: must be two numbers"),
    (["--set", "crop_scale=[0.9,0.1]"], "--set crop_scale [0.9, 0.1] is invalid: the first value must not exceed"),
    (["--workers", "-1"], "argument -j/--workers: expected an integer >= 0, got '-1'"),
    (["--threads", "100000"], "argument --threads: expected an integer from 1 to 1024, got '100000'"),
    (["--config", "x.png"], "config file not found: x.png"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--model", "mnv4_nope"], "unknown model 'mnv4_nope'"),
]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,message", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_rejects_bad_options_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--no-progress", *argv]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("mnv4") and message in line, line
    assert not out.exists() or not any(out.iterdir())  # nothing was written


def test_resume_from_a_weights_file_or_junk_is_one_clear_line(tmp_path, capsys):
    model = mnv4.create_model("mnv4_conv_small_035", num_classes=2)
    mnv4.save_model(model, tmp_path / "best.safetensors")
    assert main(["train", "--resume", str(tmp_path / "best.safetensors")]) == 2
    assert "holds weights only, not a training state" in _one_line_error(capsys)
    (tmp_path / "last.pt").write_bytes(b"junk")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not an mnv4 training checkpoint" in _one_line_error(capsys)
    torch.save({"step": 3}, tmp_path / "other.pt")
    assert main(["train", "--resume", str(tmp_path / "other.pt")]) == 2
    assert "not an mnv4 training checkpoint (no model, optimizer, scheduler)" in _one_line_error(capsys)


def test_malformed_checkpoint_metadata_names_the_file(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"mnv4_config": "{not json"})
    assert main(["predict", str(path), "--checkpoint", str(path)]) == 2
    line = _one_line_error(capsys)
    assert str(path) in line and "not valid JSON" in line


def test_predict_and_eval_bad_inputs(tmp_path, capsys):
    ck = tmp_path / "m.safetensors"
    model = mnv4.create_model("mnv4_conv_small_035", num_classes=3)
    model.class_names = ["a", "b", "c"]
    mnv4.save_model(model, ck)
    assert main(["predict", str(tmp_path / "missing.jpg"), "--checkpoint", str(ck)]) == 2
    assert "no such image file or folder" in _one_line_error(capsys)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_text("not a jpeg")
    assert main(["predict", str(tmp_path / "junk"), "--checkpoint", str(ck), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "x.jpg: not an image PIL can read" in err and "no image could be read" in err
    assert main(["predict", str(tmp_path / "junk"), "--checkpoint", str(ck), "-k", "0"]) == 2
    assert "--topk" in _one_line_error(capsys)
    assert main(["eval", "--checkpoint", str(ck), "--device", "banana"]) == 2
    assert "--device 'banana' is invalid" in _one_line_error(capsys)
    assert main(["predict", str(tmp_path / "junk")]) == 2
    assert "no model given; pass --model" in _one_line_error(capsys)
    # A typo in the size is refused in one line, never an out-of-memory kill (CLI and library alike).
    for cmd in (["predict", str(tmp_path / "junk")], ["eval"]):
        assert main([*cmd, "--checkpoint", str(ck), "--input-size", "30000"]) == 2
        assert "--input-size: expected an integer from 16 to 2048, got '30000'" in _one_line_error(capsys)
    (tmp_path / "ok").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ok" / "a.png")
    with pytest.raises(mnv4.errors.InvalidValue, match="`input_size` 30000 is invalid: must be >= 16 and <= 2048"):
        next(mnv4.predict(model, tmp_path / "ok", input_size=30000))


def test_predict_reads_every_image_mode_in_batches_with_json_and_csv(tmp_path, capsys):
    ck = tmp_path / "m.safetensors"
    model = mnv4.create_model("mnv4_conv_small_035", num_classes=3)
    model.class_names = ["a", "b", "c"]
    mnv4.save_model(model, ck)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for mode in ("RGB", "RGBA", "LA", "P", "CMYK", "L"):
        suffix = ".jpg" if mode == "CMYK" else ".png"
        Image.new("RGB", (20, 14), (200, 30, 90)).convert(mode).save(imgs / f"{mode}{suffix}")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    argv = ["predict", str(imgs), "--checkpoint", str(ck), "--input-size", "32", "-b", "4", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 6 and all(len(r["top"]) == 3 for r in rows)
    assert "broken.png" in captured.err and "skipped 1 unreadable image(s)" in captured.err
    assert "random weights" not in captured.err  # trained checkpoint: no warning
    assert main([*argv, "--csv", "-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,rank,class,index,prob" and len(lines) == 7


def test_random_weights_are_announced(tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "-m", "mnv4_conv_small_035", "--input-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "mnv4_conv_small_035 has random weights" in err and err.count("\n") == 1


def test_old_spellings_still_work_but_are_hidden(capsys):
    assert main(["profile", "mnv4_conv_small", "--res", "160", "--batch", "2"]) == 0
    assert "@ 160x160, batch 2" in capsys.readouterr().out
    assert main(["profile", "--model", "mnv4_conv_small", "--input-size", "160"]) == 0
    assert "@ 160x160" in capsys.readouterr().out
    assert main(["profile", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--input-size" in text and "--res" not in text and "(default: 1)" in text


def test_debug_and_version_anywhere():
    assert main(["--version"]) == 0
    with pytest.raises(mnv4.MNv4Error):
        main(["profile", "mnv4_nope", "--debug"])
    with pytest.raises(mnv4.MNv4Error):
        main(["--debug", "profile", "mnv4_nope"])


def test_models_filter_and_unmatched_pattern(capsys):
    assert main(["models", "hybrid", "-v"]) == 0
    out = capsys.readouterr().out
    assert "mnv4_hybrid_large.ix_e600_r384_in1k" in out and "84.00" in out and "mnv4_conv_small " not in out
    assert main(["models", "zzz"]) == 2
    assert "no model matches 'zzz'" in _one_line_error(capsys)


def test_help_is_fast_because_torch_is_imported_lazily():
    # what makes --help fast is not importing torch (seconds); speed targets live in benchmarks
    code = (
        "import sys; from mnv4.cli import main; main(['train', '--help']);"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "NO_TORCH" in proc.stderr, proc.stderr


def test_readme_model_table_is_generated_from_the_registry():
    from pathlib import Path

    from mnv4.models.registry import models_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert models_markdown() in readme


# ---------------------------------------------------------------------------------- distill, search
@pytest.fixture
def bad_input_files(tmp_path):
    """A teacher file, a readable and an unreadable image folder, unsafe and truncated .pt files."""
    from .distill_helpers import COLORS, PP, TINY, make_folder

    teacher = mnv4.create_model(TINY, num_classes=3)
    teacher.class_names, teacher.preprocess = list(COLORS), PP
    mnv4.save_model(teacher, tmp_path / "teacher.safetensors")
    make_folder(tmp_path / "photos", per_class=2)
    for c in ("a", "b"):
        (tmp_path / "broken" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "broken" / c / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    class RunsCode:
        def __reduce__(self):
            return (print, ("this runs when unpickled",))

    torch.save({"w": RunsCode()}, tmp_path / "unsafe.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:100])
    (tmp_path / "bad.tar").write_bytes(b"not a tar archive at all" * 40)
    return tmp_path


DISTILL_SEARCH_CASES = [
    # distill label
    (["distill", "label", "--teacher", "{t}/teacher.safetensors", "--data", "{t}/nothing", "-o", "{t}/o"], "nothing"),
    (
        ["distill", "label", "--teacher", "{t}/teacher.safetensors", "--data", "{t}/broken", "-o", "{t}/o"],
        "none of 6 source images sampled across the set could be read",
    ),
    (["distill", "label", "--teacher", "{t}/missing.safetensors", "--data", "{t}/photos", "-o", "{t}/o"], "missing"),
    (
        ["distill", "label", "--teacher", "{t}/teacher.safetensors", "--data", "{t}/bad.tar", "-o", "{t}/o"],
        "bad.tar (file could not be opened successfully); pass a .tar/.tar.gz of images, or a folder",
    ),
    (
        [
            "distill",
            "label",
            "--teacher",
            "{t}/teacher.safetensors",
            "--data",
            "{t}/photos",
            "-o",
            "{t}/o",
            "--jpeg-quality",
            "101",
        ],
        "--jpeg-quality 101 is invalid",
    ),
    (
        ["distill", "label", "--teacher", "{t}/unsafe.pt", "--data", "{t}/photos", "-o", "{t}/o"],
        "it is a pickle that needs print to load",
    ),
    # distill finetune
    (
        ["distill", "finetune", "--teacher", "timm:nope", "--data", "{t}/photos", "-o", "{t}/o", "--epochs", "-1"],
        "--epochs -1.0 is invalid: must be > 0",
    ),
    (["distill", "finetune", "--teacher", "timm:nope", "--data", "{t}/photos", "-o", "{t}/o"], "no model of that name"),
    # the student's options
    (
        ["train", "--distill", "a", "--distill", "b", "--mix", "-1:2"],
        "--mix '-1:2' is invalid: every share must be positive",
    ),
    # search
    (["search", "--data", "{t}/nothing", "--target-macs", "50", "-o", "{t}/o"], "nothing"),
    (["search", "--data", "{t}/broken", "--target-macs", "50", "-o", "{t}/o"], "could be read"),
    (["search", "--data", "digits", "--target-macs", "50", "--beta", "1", "-o", "{t}/o"], "--beta"),
    (["search", "--data", "digits", "--target-ms", "-2", "-o", "{t}/o"], "--target-ms"),
    (
        ["search", "--data", "digits", "--target-macs", "50", "--space", "{t}/missing.json", "-o", "{t}/o"],
        "missing.json",
    ),
    (
        ["search", "--data", "digits", "--target-macs", "50", "--distill", "{t}/d", "-o", "{t}/o"],
        "no such soft-label dataset folder",
    ),
    # unsafe or damaged weights, wherever weights are read
    (["predict", "{t}/photos", "--checkpoint", "{t}/unsafe.pt"], "it is a pickle that needs print to load"),
    (["eval", "--checkpoint", "{t}/truncated.pt", "--data", "digits"], "it is truncated or not a PyTorch file"),
]


@pytest.mark.parametrize(
    "argv,message", DISTILL_SEARCH_CASES, ids=[" ".join(c[0][:2] + c[0][-2:]) for c in DISTILL_SEARCH_CASES]
)
def test_distill_and_search_reject_bad_input_in_one_line(argv, message, bad_input_files, capsys):
    t = str(bad_input_files)
    assert main([a.replace("{t}", t) for a in argv]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("mnv4") and message.replace("{t}", t) in line, line
    assert "\x1b[" not in line  # no terminal colour codes from torch's own messages
    assert not (bad_input_files / "o").exists() or not any((bad_input_files / "o").glob("shard-*"))


def test_offline_pretrained_fails_at_once_in_one_full_line(monkeypatch, capsys):
    import socket

    from mnv4.weights import hub

    def cache_only(local_files_only=False, **kw):
        assert local_files_only, "no download may start"
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", cache_only)
    assert main(["predict", ".", "-m", "mnv4_conv_small", "--pretrained"]) == 2
    line = _one_line_error(capsys)
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in line
    assert line.endswith("copy that machine's Hugging Face cache (~/.cache/huggingface) here")  # not cut short
    assert "--checkpoint" in line

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    tries = []

    def unreachable(address, timeout):
        tries.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    with pytest.raises(mnv4.MNv4Error, match=r"huggingface.co cannot be reached \(Name or service not known\)"):
        hub.download_weights("timm/x")
    assert len(tries) == 1 and tries[0][1] <= 5  # one short check, no retries


def test_a_finetuned_teacher_file_works_with_eval_and_predict(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from mnv4.distill.teachers import save_teacher
    from mnv4.models import Preprocess

    net = timm.create_model("resnet10t", num_classes=10)  # random weights: only the plumbing is under test
    digits = [str(i) for i in range(10)]
    pp = Preprocess(32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    path = save_teacher(net, tmp_path / "teacher.safetensors", "timm", "resnet10t", pp, digits)
    Image.new("RGB", (40, 30), (90, 10, 200)).save(tmp_path / "x.png")

    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(path), "--json", "-k", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["top"]) == 2 and {c["class"] for c in row["top"]} <= set(digits)

    # no --data: a model of the digits' classes is evaluated on the digits, and says so
    argv = ["eval", "--checkpoint", str(path), "--batch-size", "360", "--no-progress", "-o", str(tmp_path / "c.png")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "timm:resnet10t on digits (360 images)" in captured.out and "no --data" in captured.err

    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "-o", str(tmp_path / "t.onnx")]) == 2
    assert "is a teacher file of `mnv4 distill finetune` (timm:resnet10t)" in _one_line_error(capsys)


def test_eval_without_data_for_other_classes_is_one_line(tmp_path, capsys):
    model = mnv4.create_model("mnv4_conv_small_035", num_classes=3)
    model.class_names = ["a", "b", "c"]
    assert main(["eval", "--checkpoint", str(mnv4.save_model(model, tmp_path / "m.safetensors"))]) == 2
    assert "--data is required: the labelled images to evaluate on" in _one_line_error(capsys)


def _file(tmp_path):
    f = tmp_path / "file"
    f.write_text("a file, not a folder")
    return f


OUTPUT_CASES = [  # (argv with {f} = an existing file, the flag named) -- refused before any work
    (["train", "-o", "{f}/sub"], "--output {f}/sub: {f} is a file, so no folder can be made under it"),
    (["eval", "-m", "mnv4_conv_small_035", "-o", "{f}/cm.png"], "--output {f}/cm.png: {f} is a file"),
    (["eval", "-m", "mnv4_conv_small_035", "-o", "{d}"], "--output {d} is a folder, not a file"),
    (["plot", "{d}", "-o", "{f}/c.png"], "--output {f}/c.png: {f} is a file"),
    (["convert", "{f}", "{f}/x.safetensors"], "dst {f}/x.safetensors: {f} is a file"),
    (["search", "--data", "digits", "-o", "{f}"], "--output {f} is a file, not a folder"),
    (["distill", "label", "--teacher", "t", "--data", "{d}", "-o", "{f}"], "--output {f} is a file, not a folder"),
    (["detect", "eval", "--checkpoint", "{f}", "-o", "{f}/pr.png"], "--output {f}/pr.png: {f} is a file"),
    (["detect", "predict", "{f}", "--checkpoint", "{f}", "--save-images", "{f}"], "--save-images {f} is a file"),
    (["hub", "push", "{f}", "--repo-id", "a/b", "--local-dir", "{f}"], "--local-dir {f} is a file, not a folder"),
    (["roofline", "sweep", "-o", "{f}/s.png"], "--output {f}/s.png: {f} is a file"),
]


@pytest.mark.parametrize("argv,message", OUTPUT_CASES, ids=[" ".join(c[0][:2]) for c in OUTPUT_CASES])
def test_an_impossible_output_path_is_refused_before_any_work(argv, message, tmp_path, capsys):
    f, d = _file(tmp_path), tmp_path / "folder"
    d.mkdir()
    fill = {"f": str(f), "d": str(d)}
    assert main([a.format(**fill) for a in argv]) == 2
    assert message.format(**fill) in _one_line_error(capsys)


def test_a_config_file_of_the_users_in_the_run_folder_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "exp"
    run.mkdir()
    mine = run / "config.yaml"
    mine.write_text("# my experiment\nepochs: 0.01\n")
    assert main(["train", "--config", str(mine), "-o", str(run), "--no-progress"]) == 2
    assert "config.yaml was not written by a run (your own config?)" in _one_line_error(capsys)
    assert mine.read_text() == "# my experiment\nepochs: 0.01\n" and sorted(p.name for p in run.iterdir()) == [
        "config.yaml"
    ]


def test_spec_and_config_files_that_are_not_text_or_not_specs(tmp_path, capsys):
    png = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(png)
    for argv in (["train", "--config", str(png)], ["profile", "--spec", str(png)]):
        assert main(argv) == 2
        assert "is not a text file (YAML or JSON)" in _one_line_error(capsys)
    (tmp_path / "cfg.json").write_text('{"epochs": 1}')
    assert main(["profile", "--spec", str(tmp_path / "cfg.json")]) == 2
    assert "is not a model spec: it has no 'name' field" in _one_line_error(capsys)


def test_labels_never_go_into_a_folder_of_something_else(bad_input_files, capsys):
    t = bad_input_files
    base = ["distill", "label", "--teacher", str(t / "teacher.safetensors"), "--data", str(t / "photos"), "-o"]
    (t / "foreign").mkdir()
    (t / "foreign" / "config.json").write_text("[1, 2]")
    assert main([*base, str(t / "foreign")]) == 2
    assert "holds a config.json that `mnv4 distill label` did not write" in _one_line_error(capsys)
    (t / "run").mkdir()
    (t / "run" / "metrics.csv").write_text("epoch,step\n")
    assert main([*base, str(t / "run")]) == 2
    assert "holds a training run (metrics.csv); choose another output folder" in _one_line_error(capsys)
    assert sorted(p.name for p in (t / "run").iterdir()) == ["metrics.csv"]


def test_a_run_refused_at_setup_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # a retry must not find runs/NAME taken and go on to runs/NAME-2
        assert main(["train", "--epochs", "0.01", "--precision", "fp16", "--logger", "none", "--no-progress"]) == 2
        assert "fp16 training needs CUDA" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_more_bad_input_of_plot_eval_and_export_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("garbage\nx\n")
    (tmp_path / "m.csv").write_text("epoch,step,train_loss\n1,2,abc\n")
    cases = [
        (["plot", str(tmp_path / "run")], "is not a metrics.csv a run wrote (no epoch and step columns)"),
        (["plot", str(tmp_path / "m.csv")], "holds values that are not numbers"),
        (["eval", "-m", "mnv4_conv_small", "--val-split", "1.5"], "--val-split 1.5 is invalid: must be > 0 and < 1"),
        (
            ["export", "-m", "mnv4_conv_small_035", "--format", "onnx", "--max-accuracy-drop", "5"],
            "--max-accuracy-drop applies to int8 exports only; drop it or set --precision int8",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in _one_line_error(capsys)
    assert not list(tmp_path.glob("*.png")) and not list((tmp_path / "run").glob("*.png"))
