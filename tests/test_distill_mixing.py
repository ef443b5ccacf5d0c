"""Dynamic mixing of soft-label datasets: ratios honoured per batch, deterministic, exact on resume, sharded."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mnv4.distill.dataset import MixedSoftLabels, MixingSampler, SoftLabelSet, StudentView, parse_mix
from mnv4.distill.labelling import LabelConfig, label
from mnv4.distill.loss import sharpen, soft_cross_entropy
from mnv4.errors import InvalidValue, MNv4Error

from .distill_helpers import PP, color_teacher, make_folder


def _keys(sampler: MixingSampler, epochs: int) -> list[tuple[int, int, int]]:
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out += list(sampler)
    return out


def test_ratios_are_honoured_in_every_batch_and_over_the_run():
    s = MixingSampler([50, 70, 440], [1, 1, 2], global_batch=30, seed=3)
    for b in range(200):
        c = s.counts(b)
        assert sum(c) == 30
        for share, n in zip((7.5, 7.5, 15), c):
            assert abs(n - share) < 1.0 + 1e-9
    keys = _keys(s, 3)
    counts = Counter(k for k, _, _ in keys)
    total = len(keys)
    assert total == 3 * (560 // 30) * 30
    for k, share in enumerate((0.25, 0.25, 0.5)):
        assert abs(counts[k] / total - share) < 1 / total + 1e-9
    # a small set is passed over many times; each pass is a permutation of the whole set
    first = [(p, i) for k, p, i in keys if k == 0]
    passes = {}
    for p, i in first:
        passes.setdefault(p, []).append(i)
    full = [v for p, v in passes.items() if p < max(passes)]
    assert len(full) >= 3 and all(sorted(v) == list(range(50)) for v in full)
    assert full[0] != full[1]  # reshuffled per pass


def test_mixing_is_deterministic_and_seeded():
    a = _keys(MixingSampler([40, 90], [1, 3], 16, seed=1), 2)
    b = _keys(MixingSampler([40, 90], [1, 3], 16, seed=1), 2)
    c = _keys(MixingSampler([40, 90], [1, 3], 16, seed=2), 2)
    assert a == b and a != c and Counter(k for k, _, _ in a) == Counter(k for k, _, _ in c)


def test_resume_mid_epoch_replays_the_same_batches():
    full = MixingSampler([33, 61, 97], [1, 1, 2], 12, seed=0)
    keys = _keys(full, 3)
    bpe = full.batches_per_epoch
    resumed = MixingSampler([33, 61, 97], [1, 1, 2], 12, seed=0)
    resumed.set_epoch(1, start_batch=5)
    tail = list(resumed)
    for e in (2,):
        resumed.set_epoch(e)
        tail += list(resumed)
    assert tail == keys[(bpe + 5) * 12 :]
    assert len(resumed) == bpe * 12


def test_ranks_take_disjoint_consecutive_slices_of_each_global_batch():
    one = MixingSampler([30, 50], [1, 1], 8, seed=4)
    ranks = [MixingSampler([30, 50], [1, 1], 8, rank=r, world_size=2, seed=4) for r in range(2)]
    k1, kr = list(one), [list(r) for r in ranks]
    for b in range(one.batches_per_epoch):
        assert kr[0][b * 4 : b * 4 + 4] + kr[1][b * 4 : b * 4 + 4] == k1[b * 8 : b * 8 + 8]
    # batches are shuffled, so a rank's slice is not all one dataset
    assert any(len({k for k, _, _ in kr[0][b * 4 : b * 4 + 4]}) == 2 for b in range(one.batches_per_epoch))


def test_parse_mix():
    assert parse_mix("1:1:2", 3) == [1, 1, 2] and parse_mix("2:2:4", 3) == [1, 1, 2]
    assert parse_mix("0.5:1.5", 2) == [1, 3] and parse_mix(None, 2) == [1, 1]
    for bad, n, match in (("1:0", 2, "positive"), ("1:x", 2, "separated by ':'"), ("1:1", 3, "one share per")):
        with pytest.raises(InvalidValue, match=match):
            parse_mix(bad, n)


def test_mixed_sets_must_share_classes_and_flip_is_seeded(tmp_path):
    data = make_folder(tmp_path / "img", per_class=2)
    cfg = dict(teacher="t", data=str(data), shard_size=8, batch_size=4, check_images=0)
    label(LabelConfig(out=str(tmp_path / "a"), **cfg), progress=False, teacher=color_teacher())
    label(LabelConfig(out=str(tmp_path / "b"), aug="none", **cfg), progress=False, teacher=color_teacher())
    a, b = SoftLabelSet(tmp_path / "a"), SoftLabelSet(tmp_path / "b")
    ds = MixedSoftLabels([a, b], StudentView(16, PP.mean, PP.std, hflip=0.5), seed=0)
    assert len(ds) == 12 and ds.num_classes == 3 and ds.class_names == ["red", "green", "blue"]
    x0, p0 = ds[(1, 0, 2)]
    x1, _ = ds[(1, 0, 2)]
    assert x0.shape == (3, 16, 16) and torch.equal(x0, x1) and abs(float(p0.sum()) - 1) < 1e-5
    flips = [not torch.equal(ds[(0, p, 0)][0], ds[(0, 0, 0)][0]) for p in range(1, 20)]
    assert 3 < sum(flips) < 17  # about half of the passes flip the image
    a.manifest["num_classes"] = 4
    a.num_classes = 4
    with pytest.raises(MNv4Error, match="disagree on the number of classes: .* has 4, .* has 3"):
        MixedSoftLabels([a, b], StudentView(16, PP.mean, PP.std))
    partial = LabelConfig(out=str(tmp_path / "c"), replicas=2, **cfg)
    assert label(partial, progress=False, teacher=color_teacher(), max_shards=1).stopped_early
    with pytest.raises(MNv4Error, match="labelling is not finished"):
        SoftLabelSet(tmp_path / "c")
    with pytest.raises(MNv4Error, match="not a soft-label dataset"):
        SoftLabelSet(data)
    # a shard changed in place (same size) passes the size check but not the manifest's checksum
    shard = sorted((tmp_path / "b").glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0xFF
    shard.write_bytes(bytes(raw))
    SoftLabelSet(tmp_path / "b")
    with pytest.raises(MNv4Error, match="checksum differs from the manifest"):
        SoftLabelSet(tmp_path / "b", verify=True)


def test_soft_cross_entropy_matches_hard_labels_and_kl_gradient():
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, 3, 1, 1, 2])
    hard = torch.nn.functional.one_hot(target, 4).float()
    torch.testing.assert_close(
        soft_cross_entropy(logits, hard).mean(), torch.nn.functional.cross_entropy(logits, target)
    )
    p = torch.softmax(torch.randn(5, 4), 1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), p, reduction="batchmean")
    g1 = torch.autograd.grad(soft_cross_entropy(logits, p).mean(), logits)[0]
    g2 = torch.autograd.grad(kl, logits)[0]
    torch.testing.assert_close(g1, g2)


def test_sharpen_is_the_teacher_at_another_temperature():
    z = torch.randn(6, 5)
    p = torch.softmax(z, 1)
    assert sharpen(p, 1.0) is p
    torch.testing.assert_close(sharpen(p, 0.5), torch.softmax(z / 0.5, 1))
    torch.testing.assert_close(sharpen(p, 3.0), torch.softmax(z / 3.0, 1))
    assert torch.equal(sharpen(p, 0.25).argmax(1), p.argmax(1))
    assert (sharpen(p, 0.5).max(1).values > p.max(1).values).all()
    top2 = torch.tensor([[0.6, 0.0, 0.3, 0.1, 0.0]])  # a top-k record: dropped classes stay at zero
    s = sharpen(top2, 0.5)
    assert s[0, 1] == 0 and s[0, 4] == 0
    torch.testing.assert_close(s, torch.tensor([[0.36, 0.0, 0.09, 0.01, 0.0]]) / 0.46)
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)
