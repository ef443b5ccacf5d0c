"""mnv4.data: datasets (folders, digits, Fashion-MNIST from Debian files), bad input, transforms, sampling."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mnv4.data import datasets as ds_mod
from mnv4.data.datasets import BadImageLog, collate_images, load_data
from mnv4.data.digits import digits_split
from mnv4.data.folder import BadImage
from mnv4.data.sampling import GlobalBatchSampler, SeededDataset
from mnv4.data.transforms import batch_mix, train_transform
from mnv4.errors import MNv4Error
from mnv4.models.registry import Preprocess


def _write(path, mode="RGB", size=(12, 10), color=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.new("RGB", size, (200, 30, 30)).convert("P")
    else:
        im = Image.new(mode, size, color if color is not None else (40,) * len(mode))
    im.save(path, format=fmt)
    return path


def _folder(root, classes=("cat", "dog"), n=3):
    for c in classes:
        for i in range(n):
            _write(root / c / f"{i}.png", color=(i * 40, 10, 200))
    return root


def test_digits_split_is_stratified_seeded_and_rgb():
    tr, va = digits_split(0.2, seed=0, size=24)
    assert len(tr) + len(va) == 1797 and abs(len(va) - 360) <= 1
    assert set(tr.targets) == set(va.targets) == set(range(10))
    im, y = tr[0]
    assert im.mode == "RGB" and im.size == (24, 24) and isinstance(y, int)
    tr2, _ = digits_split(0.2, seed=0, size=24)
    assert tr2.targets == tr.targets
    assert digits_split(0.2, seed=1)[0].targets != tr.targets


def test_train_val_folders_convert_modes_and_skip_broken_files(tmp_path, capsys):
    root = tmp_path / "pets"
    _folder(root / "train")
    _write(root / "train" / "cat" / "gray.png", mode="L", color=128)
    _write(root / "train" / "cat" / "palette.png", mode="P")
    _write(root / "train" / "dog" / "rgba.png", mode="RGBA", color=(255, 0, 0, 0))  # fully transparent
    good = _write(tmp_path / "x.jpg", size=(64, 64), color=(1, 2, 3), fmt="JPEG").read_bytes()
    (root / "train" / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "dog" / "notes.jpg").write_text("not an image")
    _folder(root / "val", classes=("dog",), n=2)  # val may hold a subset of the classes

    data = load_data(root)
    assert data.class_names == ["cat", "dog"] and data.name == "pets"
    assert all(y == 1 for _, y in data.val)  # 'dog' keeps train's index, not 0
    items = {p.split("/")[-1]: data.train[i][0] for i, (p, _) in enumerate(data.train.samples)}
    assert all(items[k].mode == "RGB" for k in ("gray.png", "palette.png", "rgba.png"))
    assert items["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert isinstance(items["truncated.jpg"], BadImage) and "truncated" in items["truncated.jpg"].reason.lower()
    assert isinstance(items["notes.jpg"], BadImage)

    tf = train_transform(Preprocess(input_size=8, crop_pct=1.0), hflip=0)
    seeded = SeededDataset(data.train, tf)
    batch = collate_images([seeded[i] for i in range(len(seeded))])
    x, y, bad = batch
    assert x.shape == (len(seeded) - 2, 3, 8, 8) and len(y) == len(x) and len(bad) == 2
    log = BadImageLog()
    log.add(bad)
    log.add(bad)  # the same file in the next epoch is not reported twice
    assert len(log) == 2
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "notes.jpg" in err and err.count("truncated.jpg") == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: (_folder(r / "train"), (r / "train" / "empty").mkdir()), "without images: empty"),
        (lambda r: (r / "train" / "a").mkdir(parents=True), "contains no images"),
        (lambda r: r.mkdir(), "no class sub-folders"),
        (lambda r: (_folder(r / "train"), _folder(r / "val", classes=("cat", "fox"))), "lacks: fox"),
    ],
)
def test_structural_problems_give_one_clear_error(tmp_path, make, message):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(MNv4Error, match=message):
        load_data(root)


def test_flat_folder_is_split_by_seeded_fraction(tmp_path):
    root = _folder(tmp_path / "flat", classes=("a", "b", "c"), n=10)
    d1, d2 = load_data(root, val_fraction=0.3, seed=4), load_data(root, val_fraction=0.3, seed=4)
    assert len(d1.train) == 21 and len(d1.val) == 9
    assert list(d1.val.indices) == list(d2.val.indices)
    assert not set(d1.train.indices) & set(d1.val.indices)
    assert sorted(d1.val.dataset.targets[i] for i in d1.val.indices) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified
    assert list(load_data(root, val_fraction=0.3, seed=5).val.indices) != list(d1.val.indices)


def test_unknown_data_name_is_a_clear_error(tmp_path):
    with pytest.raises(MNv4Error, match="no such folder"):
        load_data(tmp_path / "nope")


def _idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload)


def test_fashion_mnist_from_debian_files_and_message_without_them(tmp_path, monkeypatch):
    deb = tmp_path / "deb"
    deb.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _idx(
            deb / f"{split}-images-idx3-ubyte.gz", 0x803, (n, 28, 28), rng.integers(0, 255, n * 784, np.uint8).tobytes()
        )
        _idx(deb / f"{split}-labels-idx1-ubyte.gz", 0x801, (n,), bytes(range(n)))
    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST", deb)
    data = load_data("fashion-mnist", root=tmp_path / "cache")
    assert len(data.train) == 6 and len(data.val) == 4 and data.class_names[0] == "T-shirt/top"
    im, y = data.val[3]
    assert im.mode == "RGB" and im.size == (28, 28) and y == 3

    import torchvision.datasets

    def offline(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(MNv4Error, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", root=tmp_path / "cache2")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(MNv4Error, match="CIFAR-10 is not in"):
        load_data("cifar10", root=tmp_path / "cache2")


def test_train_transform_shapes_and_randaugment_magnitude_scale():
    pp = Preprocess(input_size=16, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    tf = train_transform(pp, scale=(0.5, 1.0), randaug_prob=1.0, randaug_layers=2, randaug_magnitude=15)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8))
    x = tf(im)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    ra = [t for t in tf.transforms if type(t).__name__ == "RandomApply"][0].transforms[0]
    assert ra.magnitude == 30  # TF level 15 capped at torchvision's max (= TF level 10)
    ra9 = train_transform(pp, randaug_prob=0.5, randaug_magnitude=9).transforms[4].transforms[0]
    assert ra9.magnitude == 27
    assert not any(type(t).__name__ == "RandomHorizontalFlip" for t in train_transform(pp, hflip=0).transforms)


def test_batch_mix_gives_soft_labels_and_is_off_at_zero_probability():
    assert batch_mix(10, prob=0.0) is None
    mix = batch_mix(4, prob=1.0, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    torch.manual_seed(0)
    x, y = mix(torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert y.shape == (6, 4) and torch.allclose(y.sum(1), torch.ones(6))
    assert (y.max(1).values < 1).any()  # really mixed


def test_global_batch_sampler_shards_each_global_batch_and_resumes():
    one = list(GlobalBatchSampler(20, 8, seed=3))
    r0 = list(GlobalBatchSampler(20, 8, rank=0, world_size=2, seed=3))
    r1 = list(GlobalBatchSampler(20, 8, rank=1, world_size=2, seed=3))
    assert len(one) == 16 and len(r0) == len(r1) == 8  # last partial global batch dropped
    # rank r's part of global batch k == the r-th half of the single-process global batch k
    for k in range(2):
        assert one[8 * k : 8 * k + 4] == r0[4 * k : 4 * k + 4] and one[8 * k + 4 : 8 * k + 8] == r1[4 * k : 4 * k + 4]
    s = GlobalBatchSampler(20, 8, seed=3)
    s.set_epoch(0, start_batch=1)
    assert list(s) == one[8:] and len(s) == 8
    s.set_epoch(1)
    assert [i for _, i in s] != [i for _, i in one] and all(e == 1 for e, _ in s)


def test_seeded_dataset_augments_by_sample_not_by_call_order():
    tr, _ = digits_split(size=16)
    tf = train_transform(Preprocess(input_size=16, crop_pct=1.0), scale=(0.2, 1.0), randaug_prob=1.0)
    ds = SeededDataset(tr, tf, seed=7)
    a = ds[(0, 5)][0]
    torch.rand(100)  # disturbing the global RNG changes nothing
    assert torch.equal(ds[(0, 5)][0], a)
    assert not torch.equal(ds[(1, 5)][0], a)
    state = torch.get_rng_state()
    ds[(0, 6)]
    assert torch.equal(torch.get_rng_state(), state)  # and loading does not disturb it either


def test_a_folder_of_small_photos_trains_at_their_own_size(tmp_path, capsys):
    from mnv4.cli import main

    for name, size in (("tiny", (32, 30)), ("mixed", (20, 24)), ("big", (300, 200))):
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", size, (40 * i, 0, 0)).save(tmp_path / name / c / f"{i}.png")
    (tmp_path / "tiny" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert load_data(tmp_path / "tiny").input_size == 32  # the longer side
    assert load_data(tmp_path / "mixed").input_size == 24
    assert load_data(tmp_path / "big").input_size is None  # large photos: the model's own size

    argv = ["train", "--data", str(tmp_path / "tiny"), "--batch-size", "4", "--max-steps", "1", "--no-progress"]
    main([*argv, "-o", str(tmp_path / "run")])
    assert "at 32 px (the images' own size; --input-size or the input_size field changes it)" in capsys.readouterr().out
