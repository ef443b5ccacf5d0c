"""Student training: teacher -> labels -> student end to end, offline mixing and online, exact resume, errors."""

from __future__ import annotations

import pytest
import torch

import mnv4
from mnv4.distill.labelling import LabelConfig, label
from mnv4.distill.student import DistillTrainer, train_student
from mnv4.errors import InvalidValue, MNv4Error
from mnv4.train import resolve_config, train

from .distill_helpers import COLORS, PP, TINY, color_teacher, make_folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Colour photos (train/val) and two soft-label sets: D1-style on the labelled images, D3-style on an
    unlabelled pool, both labelled by a teacher that knows the colours."""
    root = tmp_path_factory.mktemp("distill")
    make_folder(root / "photos" / "train", per_class=12, seed=1)
    make_folder(root / "photos" / "val", per_class=10, seed=2)
    make_folder(root / "pool", per_class=12, flat=True, seed=3)
    common = dict(teacher="colornet", shard_size=16, batch_size=16, check_images=0, record_size=20)
    d1 = LabelConfig(data=str(root / "photos"), out=str(root / "d1"), replicas=2, **common)
    d3 = LabelConfig(data=str(root / "pool"), out=str(root / "d3"), aug="inception-randaug-l2m5", **common)
    for cfg in (d1, d3):
        label(cfg, progress=False, teacher=color_teacher())
    return root


def _cfg(root, out, **kw):
    base = dict(
        model=TINY.to_dict(),
        distill=(str(root / "d1"), str(root / "d3")),
        mix="1:2",
        data=str(root / "photos"),
        input_size=16,
        epochs=6,
        batch_size=16,
        lr=1e-2,
        lr_scaling="none",
        warmup_epochs=0.5,
        ema_decay=0.9,
        ema_start_epochs=1,
        output=str(out),
    )
    base.update(kw)
    return resolve_config("distill", **base)


@pytest.mark.slow
def test_teacher_labels_student_end_to_end_agrees_with_teacher(labelled, tmp_path):
    res = train_student(_cfg(labelled, tmp_path / "run"), progress=False)
    s = res.summary
    assert s["num_classes"] == 3 and s["distill"]["mix"] == "1:2" and s["distill"]["records"] == [72, 36]
    assert s["distill"]["val_classes_matched"] == "by class name" and s["distill"]["teacher_temperature"] == 1.0
    assert res.model.class_names == list(COLORS)  # the teacher's classes, in the teacher's order
    # The teacher is right on every val image, so val top-1 is the student's agreement with it.
    assert s["val_top1"] >= 80.0, s  # chance is 33%


@pytest.mark.slow
def test_distillation_resume_is_bit_exact(labelled, tmp_path):
    cfg = _cfg(labelled, tmp_path / "full", epochs=2)
    full = train_student(cfg, progress=False)
    cfg2 = _cfg(labelled, tmp_path / "split", epochs=2)
    stopped = train_student(cfg2, max_steps=5, progress=False)  # mid-epoch 2 of 2 (6 steps per epoch)
    assert stopped.stopped_early
    resumed = train_student(cfg2, resume=stopped.run_dir / "last.pt", progress=False)
    for name, ref in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], ref), name
    for name, ref in full.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[name], ref), name
    assert resumed.summary["val_top1"] == full.summary["val_top1"]


@pytest.mark.slow
def test_online_teacher_trains_the_student_with_the_same_loss(labelled, tmp_path):
    teacher = mnv4.create_model(TINY, num_classes=3)
    teacher.class_names, teacher.preprocess = list(COLORS), PP
    mnv4.save_model(teacher, tmp_path / "teacher.safetensors")
    cfg = resolve_config(
        "distill",
        model=TINY.to_dict(),
        teacher=str(tmp_path / "teacher.safetensors"),
        data=str(labelled / "photos"),
        input_size=16,
        epochs=1,
        batch_size=12,
        output=str(tmp_path / "online"),
    )
    seen = []

    class Spy(DistillTrainer):
        def make_targets(self, x, y):
            x2, p = super().make_targets(x, y)
            seen.append((x.dtype, x.shape, x2.shape, p))
            return x2, p

    res = Spy(cfg, progress=False).run()
    assert res.summary["distill"]["online_teacher"].endswith("teacher.safetensors")
    dtype, raw_shape, student_shape, probs = seen[0]
    # the teacher saw the augmented image at its 24 px, the student the same image at 16 px
    assert dtype == torch.uint8 and raw_shape[-1] == 24 and student_shape[-1] == 16
    assert probs.shape == (12, 3) and torch.allclose(probs.sum(1), torch.ones(12), atol=1e-5)
    assert len(seen) == res.summary["steps"]


def test_config_errors_for_distillation(labelled, tmp_path):
    with pytest.raises(MNv4Error, match="recipe distill needs soft-label folders"):
        resolve_config("distill", data="digits")
    with pytest.raises(MNv4Error, match="either `distill` soft-label folders or a live `teacher`"):
        resolve_config("distill", distill=("a",), teacher="efficientnet-lite0")
    with pytest.raises(InvalidValue, match="one share per soft-label dataset"):
        resolve_config("distill", distill=("a", "b"), mix="1:1:2")
    with pytest.raises(MNv4Error, match="`mix` sets the shares"):
        resolve_config("quick", mix="1:1")
    with pytest.raises(MNv4Error, match="`teacher_temperature` reshapes teacher targets"):
        resolve_config("quick", teacher_temperature=0.5)
    with pytest.raises(InvalidValue, match="teacher_temperature"):
        resolve_config("distill", distill=("a",), teacher_temperature=0.0)
    with pytest.raises(InvalidValue, match="`teacher_aug` 'flip' is invalid"):
        train_student(resolve_config("distill", teacher="efficientnet-lite0", teacher_aug="flip", data="digits"))
    # the plain trainer refuses a distillation config instead of training on hard labels
    with pytest.raises(MNv4Error, match="train it with mnv4.distill.train_student"):
        train(_cfg(labelled, tmp_path / "plain"), progress=False)


def test_mismatched_classes_give_one_clear_error(labelled, tmp_path):
    other = tmp_path / "other"
    make_folder(other / "train", per_class=2)
    (other / "train" / "red").rename(other / "train" / "purple")
    make_folder(other / "val", per_class=2)
    (other / "val" / "red").rename(other / "val" / "purple")
    cfg = _cfg(labelled, tmp_path / "run", data=str(other))
    with pytest.raises(MNv4Error, match=r"does not match the classes of colornet \(3 classes\)"):
        train_student(cfg, progress=False)
    with pytest.raises(MNv4Error, match="no such soft-label dataset folder"):
        train_student(_cfg(labelled, tmp_path / "run2", distill=(str(tmp_path / "nope"),), mix=None), progress=False)
    with pytest.raises(MNv4Error, match="unknown teacher 'resnet_of_dreams'"):
        train_student(
            resolve_config("distill", teacher="resnet_of_dreams", data=str(labelled / "photos")), progress=False
        )


def test_student_loss_uses_the_teacher_temperature(labelled, tmp_path):
    from mnv4.distill.loss import sharpen, soft_cross_entropy

    trainer = DistillTrainer.__new__(DistillTrainer)  # the loss needs only the config
    z, p = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    for t in (1.0, 0.5):
        trainer.cfg = _cfg(labelled, tmp_path / "run", teacher_temperature=t)
        torch.testing.assert_close(trainer.loss(z, p), soft_cross_entropy(z, sharpen(p, t)))
    assert not torch.allclose(trainer.loss(z, p), soft_cross_entropy(z, p))
