"""Detection training, evaluation and the `mnv4 detect` commands: bit-exact resume, overfitting a tiny set,
predictions in original pixels, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from mnv4.cli import main
from mnv4.detect.data import load_detection_data
from mnv4.detect.formats import DetRecord, write_yolo_txt
from mnv4.detect.recipes import HEAD_DEFAULTS, resolve_detect_config
from mnv4.detect.train import PackedTargets, train_detector, unpack_targets

from .conftest import require

require("faster_coco_eval")  # the detect extra; CI (MNV4_REQUIRE_RUNTIMES=1) fails instead of skipping
SHAPES = ["square", "disc"]


def _shapes_set(
    root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0, most: int = 2, sides=(16, 28)
) -> Path:
    """A YOLO folder of grey canvases holding 1 to ``most`` red squares (class 0) and green discs (class 1)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_val)):
        (root / split / "images").mkdir(parents=True)
        for i in range(n):
            im = Image.new("RGB", (size, size), (128, 128, 128))
            draw = ImageDraw.Draw(im)
            boxes, labels = [], []
            for k in range(int(rng.integers(1, most + 1))):
                side = int(rng.integers(*sides))
                x = int(rng.integers(0, max(1, size // most - side // 2))) + (size // most) * k
                y = int(rng.integers(0, size - side))
                cls = int(rng.integers(0, 2))
                box = [x, y, x + side, y + side]
                (draw.rectangle if cls == 0 else draw.ellipse)(box, fill=(220, 30, 30) if cls == 0 else (30, 200, 30))
                boxes.append(box)
                labels.append(cls)
            im.save(root / split / "images" / f"{i}.png")
            rec = DetRecord(f"{i}.png", size, size, np.array(boxes, np.float32), np.array(labels))
            write_yolo_txt(root / split / "labels" / f"{i}.txt", rec)
    (root / "data.yaml").write_text(f"train: train/images\nval: valid/images\nnames: {SHAPES}\n")
    return root


def _cfg(tiny_hybrid_spec, out: Path, **kw):
    fields = dict(
        model=tiny_hybrid_spec.to_dict(),
        head_options={"width": 16, "num_convs": 1},
        input_size=64,
        batch_size=4,
        epochs=2,
        warmup_epochs=0,
        output=str(out),
        device="cpu",
        workers=0,
        randaug_prob=0.5,
        ema_decay=0.9,
    )
    fields.update(kw)
    return resolve_detect_config("detect-small", **fields)


def test_packed_targets_round_trip():
    t = [
        {"boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), "labels": torch.tensor([2, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    images, packed, bad = PackedTargets(3)([(torch.zeros(3, 8, 8), t[0]), (torch.ones(3, 8, 8), t[1])])
    assert packed.shape == (2, 3, 5) and images.shape == (2, 3, 8, 8) and bad == []
    back = unpack_targets(packed)
    for a, b in zip(back, t):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_resume_is_bit_exact(tmp_path, tiny_hybrid_spec):
    """Stopping after 3 of 4 steps and resuming gives the weights (raw and EMA) of the uninterrupted run."""
    data = load_detection_data(_shapes_set(tmp_path / "data"))
    full = train_detector(_cfg(tiny_hybrid_spec, tmp_path / "full"), data=data, progress=False)
    cut = _cfg(tiny_hybrid_spec, tmp_path / "cut")
    first = train_detector(cut, data=data, max_steps=3, progress=False)
    assert first.stopped_early and first.step == 3
    done = train_detector(cut, resume=tmp_path / "cut", data=data, progress=False)
    assert done.step == full.step == 4
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "step"] and "val_AP50" in rows[0] and len(rows) == 3
    assert (tmp_path / "full" / "pr_curve.png").is_file()
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["task"] == "detection"
    assert summary["anchor_coverage"]["boxes"] > 0 and 0.0 <= summary["anchor_coverage"]["covered"] <= 1.0
    from mnv4.errors import MNv4Error
    from mnv4.train.runs import resumed_train_config

    with pytest.raises(MNv4Error, match="is a detection training run; continue it with `mnv4 detect train --resume"):
        resumed_train_config(tmp_path / "cut" / "last.pt", {})  # the classification trainer's config


def test_auto_anchors_are_fitted_before_training_and_saved_as_numbers(tmp_path, tiny_hybrid_spec):
    data = load_detection_data(_shapes_set(tmp_path / "data"))
    opts = {"width": 16, "num_convs": 1, "anchor_scale": "auto"}
    cfg = _cfg(tiny_hybrid_spec, tmp_path / "run", head_options=opts, epochs=1)
    lines: list[str] = []
    train_detector(cfg, data=data, progress=False, log=lines.append)
    fitted = [line for line in lines if line.startswith("anchors fitted to")]
    assert len(fitted) == 1 and "anchor_scale 2" in fitted[0], lines  # 16-28 px boxes at 64 px: the floor, 2
    from mnv4.detect.factory import load_detector

    saved = load_detector(tmp_path / "run" / "last.safetensors")
    assert saved.config["head_options"]["anchor_scale"] == 2.0


def test_small_data_ssdlite_trains_with_fitted_anchors_by_default(tmp_path, tiny_hybrid_spec):
    """detect-small's SSDLite without head options: expansion taps where the backbone has them, and every
    anchor option fitted to the training boxes before the model is built (one log line), saved as values."""
    data_dir = _shapes_set(tmp_path / "data")
    cfg = resolve_detect_config(
        data=str(data_dir), model=tiny_hybrid_spec.to_dict(), head="ssdlite", input_size=64, batch_size=4,
        epochs=1, warmup_epochs=0, output=str(tmp_path / "run"), device="cpu", workers=0,
    )  # fmt: skip
    assert cfg.recipe == "detect-small" and cfg.head_options["scales"] == "auto"
    lines: list[str] = []
    train_detector(cfg, data=load_detection_data(data_dir), progress=False, log=lines.append)
    fitted = [line for line in lines if line.startswith("anchors fitted to")]
    assert len(fitted) == 1 and "levels [2, 3, 4]" in fitted[0] and "scales [" in fitted[0], lines
    from mnv4.detect.factory import load_detector

    opts = load_detector(tmp_path / "run" / "last.safetensors").config["head_options"]
    # the tiny spec has no expansion map at stride 16 (its stage strides before expanding): the stage ends
    assert opts["feature_location"] == "stage" and opts["levels"] == [2, 3, 4]
    assert len(opts["scales"]) == 3 + len(opts["extra_widths"]) + 1  # a scale per map, plus one
    assert all(isinstance(v, float) for v in opts["scales"]) and opts["scales"] == sorted(opts["scales"])
    assert isinstance(opts["min_ratio"], float) and opts["min_ratio"] < 0.5


@pytest.mark.slow
def test_overfits_a_tiny_set(tmp_path, tiny_hybrid_spec):
    """8 canvases with a red square or a green disc each, trained and evaluated on themselves: AP50 > 0.9."""
    data = load_detection_data(_shapes_set(tmp_path / "data", n_train=8, most=1, sides=(26, 40)))
    data.splits["val"] = data.splits["train"]
    cfg = _cfg(
        tiny_hybrid_spec,
        tmp_path / "run",
        head="ssdlite",
        head_options={"extra_widths": [32, 32]},
        epochs=160,
        batch_size=8,
        lr=5e-3,
        warmup_epochs=4,
        weight_decay=0.0,
        eval_every=160,
        scale_jitter=(1.0, 1.0),
        hflip=0.0,
        randaug_prob=0.0,
        ema_decay=0.0,
    )
    result = train_detector(cfg, data=data, progress=False)
    assert result.summary["val_AP50_final"] > 0.9, result.summary


# ---------------------------------------------------------------------------------------------- the commands
@pytest.fixture
def saved_detector(tmp_path, tiny_hybrid_spec) -> Path:
    from mnv4.detect import create_detector, save_detector

    det = create_detector(tiny_hybrid_spec, classes=SHAPES, image_size=64, width=16, num_convs=1)
    return save_detector(det, tmp_path / "det.safetensors")


def test_predict_writes_boxes_in_original_pixels(tmp_path, saved_detector, capsys):
    """A detector whose outputs are replaced by a known box: the command maps it back to original pixels."""
    Image.new("RGB", (128, 64), (0, 0, 255)).save(tmp_path / "wide.png")
    from mnv4.detect.model import Detector

    def fixed(self, images, targets=None):
        return [
            {
                "boxes": torch.tensor([[16.0, 24.0, 48.0, 40.0]]),
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1]),
            }
            for _ in images
        ]

    mp = pytest.MonkeyPatch()
    mp.setattr(Detector, "forward", fixed)
    try:
        code = main(
            [
                "detect",
                "predict",
                str(tmp_path / "wide.png"),
                "--checkpoint",
                str(saved_detector),
                "--save-images",
                str(tmp_path / "drawn"),
            ]
        )
        out = capsys.readouterr().out.strip().splitlines()
        assert code == 0 and len(out) == 1
        row = json.loads(out[0])
        # 128 x 64 letterboxed into 64 x 64: scale 0.5, 16 px of padding above; [16, 24, 48, 40] -> [32, 16, 96, 48]
        assert row["detections"] == [{"label": 1, "class": "disc", "score": 0.9, "box": [32.0, 16.0, 96.0, 48.0]}]
        assert Image.open(tmp_path / "drawn" / "wide.png").size == (128, 64)
        code = main(
            [
                "detect",
                "predict",
                str(tmp_path),
                "--checkpoint",
                str(saved_detector),
                "--format",
                "csv",
                "--score-threshold",
                "0.95",
            ]
        )
        assert code == 0 and capsys.readouterr().out.strip().splitlines() == ["path,label,class,score,x1,y1,x2,y2"]
    finally:
        mp.undo()


def test_eval_prints_one_json_object(tmp_path, saved_detector, capsys):
    data = _shapes_set(tmp_path / "data", n_train=2, n_val=3)
    code = main(
        [
            "detect",
            "eval",
            "--checkpoint",
            str(saved_detector),
            "--data",
            str(data),
            "--json",
            "-o",
            str(tmp_path / "pr.png"),
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    d = json.loads(out[0])
    assert {"AP", "AP50", "AP75", "AP_small", "per_class_AP"} <= set(d) and d["num_images"] == 3
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["detect", "eval", "--checkpoint", "{tmp}/missing.safetensors"], "no such file"),
        (["detect", "eval", "--checkpoint", "{det}", "--data", "{tmp}/nowhere"], "no such folder"),
        (["detect", "eval", "--checkpoint", "{det}", "--data", "{tmp}"], "not a detection dataset"),
        (["detect", "predict", "{tmp}/missing.jpg", "--checkpoint", "{det}"], "no such image file"),
        (["detect", "predict", "{tmp}/broken.jpg", "--checkpoint", "{det}"], "no image could be read"),
        (["detect", "predict", "{tmp}/ok.png", "--checkpoint", "{det}", "--score-threshold", "2"], "--score-threshold"),
        (["detect", "predict", "{tmp}/ok.png", "--checkpoint", "{tmp}/broken.jpg"], "broken.jpg"),
        (["detect", "train", "--data", "{tmp}/nowhere"], "no such folder"),
        (["detect", "train", "--epochs", "-1"], "--epochs"),
        (["detect", "train", "--head", "yolo"], "--head"),
        (["detect", "train", "--set", "scale_jitter=[2, 1]"], "scale_jitter"),
        (["detect", "eval", "--checkpoint", "{det}", "--val-split", "7"], "val-split"),
        (["detect", "train", "--checkpoint", "{det}", "--head", "ssdlite"], "contradicts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, saved_detector, capsys, argv, match):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    argv = [a.format(tmp=tmp_path, det=saved_detector) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("mnv4: error:") and match in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_predict_failure_leaves_an_existing_output_file_alone(tmp_path, saved_detector, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "boxes.jsonl"
    out.write_text('{"path": "earlier run"}\n')
    argv = ["detect", "predict", str(tmp_path / "broken.jpg"), "--checkpoint", str(saved_detector), "-o", str(out)]
    code = main(argv)
    assert code == 2 and "no image could be read" in capsys.readouterr().err
    assert out.read_text() == '{"path": "earlier run"}\n'


def test_predictions_go_to_the_annotation_frame_when_its_stated_size_is_wrong(tmp_path):
    """A COCO file stating 120 x 80 for a 60 x 40 image: its boxes (the ground truth) are in the stated
    frame, so a detector that finds the object exactly must be scored there, not in the file's pixels."""
    from mnv4.detect.evaluate import predict_records
    from mnv4.detect.transforms import letterbox_geometry

    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    rec = DetRecord(str(tmp_path / "a.png"), 120, 80, np.array([[20, 20, 60, 50]], np.float32), np.array([0]), 1)
    (sx, sy), px, py, _, _ = letterbox_geometry(60, 40, 64)
    found = torch.tensor([[10 * sx + px, 10 * sy + py, 30 * sx + px, 25 * sy + py]])  # the object in the file

    class Stub(torch.nn.Module):
        def forward(self, images, targets=None):
            return [{"boxes": found, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])} for _ in images]

    (pred,) = predict_records(Stub(), [rec], 64)
    np.testing.assert_allclose(pred["boxes"].numpy(), [[20, 20, 60, 50]], atol=1e-3)


def test_the_resize_mode_travels_with_the_detector(tmp_path, tiny_hybrid_spec, monkeypatch):
    """Trained stretched (`resize: fixed`), a detector is evaluated and run stretched too: the mode is in
    its file, and prediction maps boxes back with it. Files without the key are letterbox ones."""
    from mnv4.detect import create_detector, load_detector, save_detector
    from mnv4.detect.evaluate import image_records, predict_records, resize_mode
    from mnv4.detect.factory import build_from_config
    from mnv4.detect.model import Detector

    det = create_detector(tiny_hybrid_spec, classes=SHAPES, image_size=64, width=16, num_convs=1, resize="fixed")
    back = load_detector(save_detector(det, tmp_path / "f.safetensors"))
    assert back.resize == resize_mode(back) == "fixed"
    old = build_from_config({k: v for k, v in det.config.items() if k != "resize"})
    assert old.resize == "letterbox"
    Image.new("RGB", (128, 32)).save(tmp_path / "wide.png")

    def fixed_box(self, images, targets=None):
        box = torch.tensor([[16.0, 16, 48, 48]])
        return [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]

    monkeypatch.setattr(Detector, "forward", fixed_box)
    records = image_records([tmp_path / "wide.png"])
    stretched = predict_records(back, records, 64)[0]["boxes"]  # x / 0.5, y / 2
    np.testing.assert_allclose(stretched.numpy(), [[32, 8, 96, 24]])
    padded = predict_records(old, records, 64)[0]["boxes"]  # x / 0.5, (y - 24) / 0.5, clipped
    np.testing.assert_allclose(padded.numpy(), [[32, 0, 96, 32]])


def test_fine_tuning_a_saved_detector_takes_its_head_size_and_mode(tmp_path, saved_detector):
    from safetensors.torch import save_file

    from mnv4.errors import MNv4Error

    cfg = resolve_detect_config(None, None, data=str(tmp_path), checkpoint=str(saved_detector))
    assert (cfg.recipe, cfg.head, cfg.input_size, cfg.resize) == ("detect-small", "retinanet", 64, "letterbox")
    assert cfg.head_options is None and isinstance(cfg.model, dict)  # its own anchors; its searched spec
    with pytest.raises(MNv4Error, match=r"--input-size 320 contradicts .*\(head retinanet, input size 64 px\)"):
        resolve_detect_config(None, None, data="x", checkpoint=str(saved_detector), input_size=320)
    with pytest.raises(MNv4Error, match="--head ssdlite contradicts"):
        resolve_detect_config(None, None, data="x", checkpoint=str(saved_detector), head="ssdlite")
    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(MNv4Error, match="not an mnv4 detector; a classifier's weights go to --backbone-checkpoint"):
        resolve_detect_config(None, None, data="x", checkpoint=str(tmp_path / "plain.safetensors"))


def test_a_saved_detector_takes_new_classes_with_fresh_class_layers_only(saved_detector):
    from mnv4.detect import create_detector, load_detector

    old = load_detector(saved_detector).state_dict()
    for classes in (["a", "b"], list(reversed(SHAPES))):  # another count; the same count under other names
        new = create_detector(checkpoint=saved_detector, classes=classes)
        assert new.classes == classes
        sd = new.state_dict()
        changed = {k for k, v in sd.items() if v.shape != old[k].shape or not torch.equal(v, old[k])}
        assert changed and all("classification_head.cls_logits" in k for k in changed), changed


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process_with_accumulation(tmp_path, tiny_hybrid_spec):
    """As tests/test_distributed.py for classification: 2 DDP ranks of 2 images train like 1 process with 2
    micro-batches of 2 (parameters within 1e-4; BN running statistics are rank 0's under DDP, so not compared)."""
    from .cli_run import run_mnv4

    data = _shapes_set(tmp_path / "data", n_train=8, n_val=2)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(
        json.dumps(
            {"model": tiny_hybrid_spec.to_dict(), "head_options": {"width": 16, "num_convs": 1}, "input_size": 64}
            | {"randaug_prob": 0.5, "lr_scaling": "none", "epochs": 1, "device": "cpu"}
        )
    )
    common = ["detect", "train", "--data", str(data), "--config", str(conf), "--recipe", "detect-small", "-b", "4"]
    single = run_mnv4([*common, "--micro-batch", "2", "-o", str(tmp_path / "one"), "--no-progress"])
    assert single.returncode == 0, single.stderr[-2000:]
    assert "2 x 2 accumulation x 1 process(es)" in single.stdout
    ddp = run_mnv4([*common, "-o", str(tmp_path / "two"), "--no-progress"], processes=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 x 1 accumulation x 2 process(es)" in ddp.stdout and "run folder:" in ddp.stdout
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def test_digits_recipe_options_follow_the_head_asked_for():
    """The digits recipe's head options belong to its RetinaNet head: asking for SSDLite (by --head or by a
    detector name) drops them instead of failing on unknown options; explicit options are kept."""
    default = resolve_detect_config()
    assert default.head == "retinanet" and default.head_options["anchor_scale"] == 2.0
    for cfg in (resolve_detect_config(head="ssdlite"), resolve_detect_config(model="ssdlite_mnv4_conv_small")):
        assert cfg.head == "ssdlite" and cfg.head_options is None
    mine = resolve_detect_config(head="ssdlite", head_options={"extra_widths": [8, 8]})
    assert mine.head_options == {"extra_widths": [8, 8]}
    assert resolve_detect_config(model="retinanet_mnv4_conv_small").head_options == default.head_options


def test_the_recipe_follows_the_data(tmp_path):
    """Your own boxes get detect-small (320 px) rather than the 96 px digits recipe, whether the data come
    by flag or config file; its SSDLite gets HEAD_DEFAULTS (anchors fitted), which given options replace;
    RetinaNet and the other recipes keep the factory defaults."""
    assert resolve_detect_config().recipe == resolve_detect_config(data="digits").recipe == "detect-digits"
    mine = resolve_detect_config(data="my_boxes")
    assert (mine.recipe, mine.input_size, mine.head, mine.head_options) == ("detect-small", 320, "retinanet", None)
    conf = tmp_path / "c.yaml"
    conf.write_text("data: my_boxes\nepochs: 3\n")
    assert resolve_detect_config(config_file=conf).recipe == "detect-small"
    ssd = resolve_detect_config(data="my_boxes", model="ssdlite_mnv4_conv_small")
    assert ssd.head == "ssdlite" and ssd.head_options == HEAD_DEFAULTS["detect-small"]["ssdlite"]
    assert ssd.head_options["levels"] == ssd.head_options["scales"] == "auto"
    given = resolve_detect_config("detect-small", head="ssdlite", head_options={"min_ratio": 0.1})
    assert given.head_options == {"min_ratio": 0.1}
    assert resolve_detect_config("detect-digits", data="my_boxes", head="ssdlite").head_options is None
    assert resolve_detect_config("detect-paper", head="ssdlite").head_options is None
