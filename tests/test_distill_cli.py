"""`mnv4 distill label | finetune` and `mnv4 train --distill/--teacher` from the command line, bad input included."""

from __future__ import annotations

import json

import pytest
import torch

import mnv4
from mnv4.cli import main
from mnv4.distill.teachers import load_teacher

from .distill_helpers import COLORS, PP, TINY, make_folder


@pytest.fixture
def teacher_file(tmp_path):
    model = mnv4.create_model(TINY, num_classes=3)
    model.class_names, model.preprocess = list(COLORS), PP
    return str(mnv4.save_model(model, tmp_path / "teacher.safetensors"))


def test_label_then_train_from_the_command_line(tmp_path, teacher_file, capsys):
    photos = make_folder(tmp_path / "photos" / "train", per_class=6, bad=True).parent
    make_folder(photos / "val", per_class=3, seed=5)
    out = tmp_path / "d1"
    args = ["distill", "label", "--teacher", teacher_file, "--data", str(photos), "--out", str(out)]
    assert (
        main([*args, "--shard-size", "10", "--replicas", "2", "--top-k", "2", "--crop-min", "0.3", "--no-progress"])
        == 0
    )
    text = capsys.readouterr().out
    assert "teacher top-1 on 18 un-augmented labelled images" in text and "bytes per record" in text
    assert "top-2: top-1 unchanged" in text and f"mnv4 train --distill {out}" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 36 and manifest["skipped_records"] == 2 and len(manifest["shards"]) == 4
    assert manifest["labels"]["storage"] == "top-2" and manifest["augmentation"]["crop_scale"] == [0.3, 1.0]

    # a complete folder is not labelled again, and says so
    assert main([*args, "--no-progress"]) == 2
    assert "already complete" in capsys.readouterr().err

    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "input_size": 16}))
    run = tmp_path / "student"
    train = ["train", "--distill", str(out), "--data", str(photos), "--config", str(conf), "--batch-size", "12"]
    assert main([*train, "--epochs", "1", "--output", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "distill" and summary["num_classes"] == 3 and summary["steps"] == 3
    assert mnv4.create_model(checkpoint=run / "last.safetensors").class_names == list(COLORS)


def test_command_line_errors_are_one_line(tmp_path, teacher_file, capsys):
    photos = make_folder(tmp_path / "photos", per_class=2)
    cases = [
        (["distill", "label", "--teacher", teacher_file, "--data", str(photos)], "--output` is required"),
        (
            ["distill", "label", "--teacher", "nope", "--data", str(photos), "-o", str(tmp_path / "x")],
            "unknown teacher",
        ),
        (
            [
                "distill",
                "label",
                "--teacher",
                teacher_file,
                "--data",
                str(photos),
                "-o",
                str(tmp_path / "y"),
                "--top-k",
                "3",
            ],
            "--top-k 3 must be below the teacher's 3 classes",
        ),
        (["train", "--distill", str(tmp_path / "none"), "--data", str(photos)], "no such soft-label dataset"),
        (["train", "--distill", "a", "--distill", "b", "--mix", "1:2:3"], "--mix '1:2:3' is invalid"),
        (["train", "--teacher", teacher_file, "--distill", "a"], "not both"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message.replace("`", "") in err.replace("`", ""), err


def _photos_and_timm_teacher(tmp_path, per_class: int, classes: int):
    """A train/val photo folder (3 classes) and initial weights of timm's test_efficientnet with ``classes``."""
    timm = pytest.importorskip("timm")
    photos = make_folder(tmp_path / "photos" / "train", per_class=per_class).parent
    make_folder(photos / "val", per_class=per_class // 2, seed=9)
    weights = tmp_path / "init.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=classes).state_dict(), weights)
    return photos, weights


@pytest.mark.slow
def test_a_stopped_teacher_fine_tuning_resumes_with_the_command_it_names(tmp_path, capsys):
    photos, weights = _photos_and_timm_teacher(tmp_path, per_class=4, classes=3)
    run = tmp_path / "teacher"
    base = ["distill", "finetune", "--teacher", "timm:test_efficientnet", "--data", str(photos)]
    base += ["--teacher-checkpoint", str(weights)]
    argv = [*base, "--input-size", "32", "--epochs", "1", "-b", "4", "--no-progress"]
    assert main([*argv, "-o", str(run), "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    named = f"mnv4 distill finetune --teacher timm:test_efficientnet --data {photos} --teacher-checkpoint {weights}"
    assert f"continue with: {named} --resume {run}" in out
    assert main([*base, "--resume", str(run), "--lr", "0.5", "--no-progress"]) == 2
    assert "--lr cannot change" in capsys.readouterr().err
    assert main([*base, "--resume", str(run), "-o", str(tmp_path / "other"), "--no-progress"]) == 2
    assert "is not the run being resumed" in capsys.readouterr().err
    assert main([*base, "--resume", str(run), "--no-progress"]) == 0
    assert "use it as --teacher" in capsys.readouterr().out and (run / "best.safetensors").is_file()


@pytest.mark.slow
def test_finetune_a_timm_teacher_and_label_with_it(tmp_path, capsys):
    photos, weights = _photos_and_timm_teacher(tmp_path, per_class=8, classes=5)  # 5 classes: replaced
    run = tmp_path / "teacher"
    argv = [
        "distill",
        "finetune",
        "--teacher",
        "timm:test_efficientnet",
        "--teacher-checkpoint",
        str(weights),
        "--data",
        str(photos),
        "--input-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "-o",
        str(run),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "use it as --teacher" in capsys.readouterr().out
    t = load_teacher(str(run / "best.safetensors"))
    assert t.identity["family"] == "timm" and t.num_classes == 3 and t.input_size == 32
    assert t.class_names == ["blue", "green", "red"] and t.preprocess.mean == (0.485, 0.456, 0.406)
    out = tmp_path / "labels"
    assert (
        main(
            [
                "distill",
                "label",
                "--teacher",
                str(run / "best.safetensors"),
                "--data",
                str(photos),
                "-o",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["teacher"]["arch"] == "test_efficientnet"
