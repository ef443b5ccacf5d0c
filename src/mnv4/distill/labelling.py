"""Teacher soft-label datasets: augment, JPEG round trip, teacher probabilities, shards + manifest.

``label(LabelConfig(...))`` makes ``replicas`` passes over a source's images. Record ``j`` is image
``j % N`` of replica ``j // N``; its augmentation is seeded by (seed, replica, image), so any record can be
made again, by any worker or rank, in any run. Records are grouped in shards of ``shard_size`` that are
written atomically, each with a small ``.stats.json`` beside it; a killed run continues at the first
missing shard, and because the teacher sees the same batches (batches never cross a shard boundary) it
ends with byte-identical shards. Under torchrun rank r labels shards r, r + world, ...; rank 0 writes
``manifest.json`` once every shard exists. Folder layout and formats: docs/distillation.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import BadImage, BadImageLog, require_readable
from ..data.sampling import sample_seed
from ..errors import MNv4Error
from ..files import DirLock, atomic_write_json, file_sha256, remove_orphan_temps
from ..threads import sample_threads
from .augment import augment, mixing_partner
from .engines import accelerate, parity_sample
from .jpeg import jpeg_roundtrip
from .policies import AugPolicy
from .requests import LABEL_COMMAND, LabelConfig
from .shards import ShardRecord, encode_probs, record_key, shard_name, write_shard
from .sources import ImageSource, map_classes, open_source, to_uint8
from .teachers import Teacher, load_teacher

__all__ = ["LabelConfig", "LabelResult", "label", "resume_command", "MANIFEST", "CONFIG", "FORMAT", "truncation_cost"]

FORMAT = "mnv4-softlabels"
MANIFEST = "manifest.json"
CONFIG = "config.json"
# Fields that decide what the records hold: a resumed run must agree on all of them.
_IDENTITY = ("aug", "crop_min", "replicas", "record_size", "jpeg_quality", "top_k", "shard_size", "seed")


@dataclass
class LabelResult:
    out: Path
    manifest: dict[str, Any]  # empty on ranks other than 0, and when stopped early
    records_this_run: int
    seconds_this_run: float
    stopped_early: bool


# --------------------------------------------------------------------------------------------- records


def _stacked(batch: list, at: int) -> tuple[list, torch.Tensor | None]:
    """A loader batch: (its items, the images at position ``at`` of the readable ones stacked into one tensor).
    A worker then hands the labelling process one shared-memory block per batch instead of one per image
    (each is a file descriptor passed over a socket, about 0.4 ms: a quarter of the teacher's time per
    image on the fast path)."""
    good = [item[at] for item in batch if not isinstance(item[1], BadImage)]
    items = [item if isinstance(item[1], BadImage) else item[:at] + (None,) + item[at + 1 :] for item in batch]
    return items, (torch.stack(good) if good else None)


class _RecordMaker(Dataset):
    """Record ``j`` -> (j, jpeg bytes, decoded uint8 image, metadata) or (j, BadImage)."""

    def __init__(self, source: ImageSource, cfg: LabelConfig, size: int) -> None:
        self.source, self.policy, self.size = source, cfg.policy(), size
        self.quality, self.seed, self.n = cfg.jpeg_quality, cfg.seed, len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple:
        with sample_threads():
            return self._make(j)

    def _make(self, j: int) -> tuple:
        replica, i = divmod(j, self.n)
        seed = sample_seed(self.seed, replica, i, 0x1ABE1)
        image = self.source.load(i)
        if isinstance(image, BadImage):
            return j, image
        meta: dict[str, Any] = {"src": self.source.ids[i], "replica": replica}
        if self.source.labels is not None:
            meta["label"] = self.source.class_names[self.source.labels[i]]
        partner = None
        if self.policy.mixup_alpha > 0:
            k = mixing_partner(i, self.n, seed)
            other = self.source.load(k)
            if isinstance(other, BadImage):
                return j, other
            partner = to_uint8(other)
            meta["partner"] = self.source.ids[k]
            if self.source.labels is not None:
                meta["partner_label"] = self.source.class_names[self.source.labels[k]]
        out, params = augment(self.policy, to_uint8(image), self.size, seed, partner)
        meta.update(params)
        data, decoded = jpeg_roundtrip(out, self.quality)
        return j, data, decoded, meta


class _CheckViews(Dataset):
    def __init__(self, source: ImageSource, teacher: Teacher, indices: list[int]) -> None:
        self.source, self.teacher, self.indices = source, teacher, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> tuple:
        i = self.indices[n]
        image = self.source.load(i)
        if isinstance(image, BadImage):
            return i, image
        return i, self.teacher.view(to_uint8(image))


def truncation_cost(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per record: KL(full || stored) in nats, and whether the stored top-1 is the teacher's, for storing
    the top ``k`` (k = 0: all, in float16), computed on what the student reads back (see ``decode_probs``)."""
    p = probs.float()
    c = p.shape[1]
    if k <= 0 or k >= c:
        q = p.half().float()
        q = q / q.sum(1, keepdim=True)
    else:
        vals, idx = p.topk(k, dim=1)
        rest = (1.0 - vals.sum(1, keepdim=True)).clamp_min(0.0)
        q = (rest / (c - k)).expand(-1, c).clone()
        q.scatter_(1, idx, vals.half().float())
        q = q / q.sum(1, keepdim=True)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-12).log()), torch.zeros_like(p)).sum(1)
    return kl, q.argmax(1).eq(p.argmax(1))


# ------------------------------------------------------------------------------------------------ label


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


def _plan_batches(shards: list[int], total: int, shard_size: int, batch: int) -> list[tuple[int, list[int], bool]]:
    out = []
    for s in shards:
        lo, hi = s * shard_size, min(total, (s + 1) * shard_size)
        starts = list(range(lo, hi, batch))
        for n, b in enumerate(starts):
            out.append((s, list(range(b, min(hi, b + batch))), n == len(starts) - 1))
    return out


def _identity(cfg: LabelConfig, teacher: Teacher, source: ImageSource, size: int) -> dict[str, Any]:
    ident = {k: getattr(cfg, k) for k in _IDENTITY}
    ident["record_size"] = size
    ident["teacher"] = {k: v for k, v in teacher.identity.items() if k != "checkpoint"}
    ident["source"] = {
        **source.describe(),
        "ids_sha256": hashlib.sha256("\n".join(source.ids).encode()).hexdigest(),
    }
    return json.loads(json.dumps(ident))  # tuples -> lists, as they come back from the file


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} then, {b!r} now"


def _check_teacher(
    cfg: LabelConfig, teacher: Teacher, source: ImageSource, info, say, progress: bool | None
) -> dict[str, Any] | None:
    """Teacher top-1 on un-augmented labelled images, before any labelling: a wrong preprocessing or class
    mapping shows up here as near-chance accuracy instead of as a useless dataset hours later."""
    if not source.labelled or cfg.check_images == 0:
        return None
    try:
        mapping, how = map_classes(source.class_names, teacher.class_names, teacher.num_classes)
    except MNv4Error as e:
        say(f"teacher top-1 check skipped: {e}")
        return None
    n = len(source)
    chosen = list(range(n)) if cfg.check_images >= n else np.linspace(0, n - 1, cfg.check_images).astype(int).tolist()
    mine = chosen[info.rank :: info.world_size]
    views = _CheckViews(source, teacher, mine)
    loader = DataLoader(
        views, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=functools.partial(_stacked, at=1)
    )
    correct = count = 0
    bar = tqdm(total=len(mine), desc="teacher check", unit="img", disable=_disable(progress, info), leave=False)
    for batch, images in loader:
        good = [i for i, x in batch if not isinstance(x, BadImage)]
        if good:
            pred = teacher.probs(images).argmax(1)
            target = torch.tensor([mapping[source.labels[i]] for i in good])
            correct += int(pred.eq(target).sum())
            count += len(good)
        bar.update(len(batch))
    bar.close()
    if info.distributed:
        t = torch.tensor([correct, count], dtype=torch.float64)
        dist.all_reduce(t)
        correct, count = int(t[0]), int(t[1])
    top1 = 100.0 * correct / max(count, 1)
    chance = 100.0 / teacher.num_classes
    say(f"teacher top-1 on {count} un-augmented labelled images: {top1:.2f}% (classes matched {how})")
    if count and top1 < 2 * chance:
        say(
            f"warning: that is near chance ({chance:.2f}%); check the teacher's preprocessing and class order "
            "before using these labels"
        )
    return {"images": count, "top1": round(top1, 4), "matched": how}


def _disable(progress: bool | None, info) -> bool | None:
    if not info.is_main or progress is False:
        return True
    return None if progress is None else False


def label(
    cfg: LabelConfig,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    max_shards: int | None = None,
    teacher: Teacher | None = None,
) -> LabelResult:
    """Label ``cfg.data`` with ``cfg.teacher`` into ``cfg.out`` (resumable; see the module docstring).

    Args:
        teacher: a ready :class:`Teacher` to use instead of loading ``cfg.teacher`` (tests, notebooks).
        progress: progress bars; None shows them on terminals only.
        log: where messages go (default: print on rank 0).
        max_shards: stop after writing that many shards in this invocation, as a killed run would (tests).
    """
    cfg.validate()
    t0 = time.perf_counter()
    from ..train.distributed import setup

    info = setup(cfg.device)
    say = log or _say
    if not info.is_main:
        say = lambda msg: None  # noqa: E731 - only rank 0 talks

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MNv4Error(f"`out` {out} is a file; give a folder for the shards")
    source = open_source(cfg.data, cfg.data_root)
    require_readable(source.load, len(source), "source")  # labelling nothing would still "succeed"
    policy = cfg.policy()
    if policy.mixup_alpha > 0 and len(source) < 2:
        raise MNv4Error(f"`aug` {cfg.aug} mixes pairs of images; {cfg.data} holds only {len(source)}")
    if teacher is None:
        teacher = load_teacher(cfg.teacher, cfg.teacher_checkpoint, cfg.teacher_size, info.device)
    size = cfg.record_size or teacher.input_size
    if cfg.top_k >= teacher.num_classes:
        raise MNv4Error(f"`top_k` {cfg.top_k} must be below the teacher's {teacher.num_classes} classes (0 = all)")
    ident = _identity(cfg, teacher, source, size)

    lock = DirLock(out, "labelling run")
    problem = None
    if info.is_main:
        try:
            problem = _claim(out, ident, lock)
        except MNv4Error as e:
            problem = str(e)
    if info.distributed:
        box = [problem]
        dist.broadcast_object_list(box, src=0)  # every rank stops on rank 0's verdict, none waits forever
        problem = box[0]
    if problem is not None:
        lock.release()
        raise MNv4Error(problem)
    job_teacher = teacher
    try:
        teacher = accelerate(teacher, cfg.engine, parity_sample(source, teacher), say, batch=cfg.batch_size)[0]
    except BaseException:
        lock.release()
        raise
    if teacher is not job_teacher:
        t0 = time.perf_counter()  # images/s counts labelling, not the one-off export (accelerate reports it)
    job = _Job(cfg, info, say, out, source, policy, teacher, size, ident, progress, t0)
    try:
        return _label(job, max_shards)
    except KeyboardInterrupt:
        say(
            f"interrupted: {len(job.shards_done())} of {job.n_shards} shards are written in {out}; "
            f"continue with: {resume_command(cfg)}"
        )
        raise
    finally:
        lock.release()


def resume_command(cfg: LabelConfig) -> str:
    """The command that continues labelling into ``cfg.out``: the same settings (those not at the command's
    default, which for ``engine`` is not the library's)."""
    import shlex

    defaults = LABEL_COMMAND
    parts = ["mnv4", "distill", "label"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("teacher", "data", "out") or value != getattr(defaults, f.name):
            flag = "--output" if f.name == "out" else "--" + f.name.replace("_", "-")
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _claim(out: Path, ident: dict[str, Any], lock: DirLock) -> str | None:
    """Lock ``out`` and check it may be labelled with these settings; the reason it may not, or None."""
    lock.acquire()
    remove_orphan_temps(out)
    if (out / MANIFEST).is_file():
        return f"{out} is already complete ({MANIFEST} exists); choose another output folder"
    run = [name for name in ("last.pt", "metrics.csv", "summary.json") if (out / name).exists()]
    if run:  # shards mixed into a training run's folder would be a mess to separate
        return f"{out} holds a training run ({', '.join(run)}); choose another output folder for the labels"
    if (out / CONFIG).is_file():
        try:
            saved = json.loads((out / CONFIG).read_text())
        except (OSError, ValueError):  # ValueError: not JSON, or not text at all
            saved = None
        if not isinstance(saved, dict) or not set(_IDENTITY) <= set(saved):
            return f"{out} holds a {CONFIG} that `mnv4 distill label` did not write; choose an empty output folder"
        diff = _first_difference(saved, ident)
        if diff:
            diff = diff if len(diff) <= 160 else diff[:157] + "..."
            return (
                f"{out} holds labels made with other settings ({diff}); resume with the same settings "
                "or choose another output folder"
            )
    else:
        atomic_write_json(out / CONFIG, ident)
    return None


@dataclass
class _Job:
    """What one labelling invocation works with, resolved by :func:`label` before any record is made."""

    cfg: LabelConfig
    info: Any  # mnv4.train.distributed.DistInfo
    say: Callable[[str], None]
    out: Path
    source: ImageSource
    policy: AugPolicy
    teacher: Teacher
    size: int  # record resolution
    ident: dict[str, Any]
    progress: bool | None
    t0: float

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.source) * self.cfg.replicas / self.cfg.shard_size)

    def shards_done(self) -> list[int]:
        return [s for s in range(self.n_shards) if (self.out / shard_name(s)).is_file()]


def _label(job: _Job, max_shards: int | None) -> LabelResult:
    cfg, info, out = job.cfg, job.info, job.out
    done = job.shards_done()
    _describe(job)
    check = None
    if len(done) < job.n_shards:
        check = _check_teacher(cfg, job.teacher, job.source, info, job.say, job.progress)
    if check is not None and info.is_main:
        atomic_write_json(out / "teacher_check.json", check)
    todo = [s for s in range(job.n_shards) if s % info.world_size == info.rank and s not in done]
    mine = todo[:max_shards] if max_shards is not None else todo
    total = len(job.source) * cfg.replicas
    job.say(
        f"labelling {cfg.replicas} x {len(job.source)} = {total} records in {job.n_shards} shards of {cfg.shard_size}"
        + (f" ({len(done)} done already)" if done else "")
        + (f" on {info.world_size} processes" if info.distributed else "")
    )
    ks = [cfg.top_k] if cfg.top_k else [k for k in (1, 5, 10) if k < job.teacher.num_classes]
    labelled_now, bad = _write_shards(job, mine, ks)
    seconds = time.perf_counter() - job.t0
    stopped = len(mine) < len(todo)
    if info.distributed:
        dist.barrier()
    manifest: dict[str, Any] = {}
    if info.is_main and not stopped and len(job.shards_done()) == job.n_shards:
        manifest = _write_manifest(cfg, out, job.n_shards, job.ident, job.teacher, job.source, job.policy, job.size, ks)
        _report(manifest, job.say, labelled_now, seconds, bad)
    return LabelResult(out, manifest, labelled_now, seconds, stopped)


def _describe(job: _Job) -> None:
    pp, cfg, source = job.teacher.preprocess, job.cfg, job.source
    job.say(
        f"teacher {job.teacher.identity['spec']} ({job.teacher.num_classes} classes) at {pp.input_size} px "
        f"(mean {tuple(round(m, 4) for m in pp.mean)}, std {tuple(round(s, 4) for s in pp.std)}, "
        f"{pp.interpolation}); records {job.size} px, JPEG quality {cfg.jpeg_quality}, aug {cfg.aug}"
    )
    kind = f"labelled, {len(source.class_names)} classes" if source.labelled else "unlabelled"
    job.say(f"source {source.location}: {len(source)} images ({kind}, {source.kind})")


def _write_shards(job: _Job, mine: list[int], ks: list[int]) -> tuple[int, BadImageLog]:
    """Label and write this rank's shards ``mine``; (records labelled, the unreadable images met)."""
    cfg, info, source = job.cfg, job.info, job.source
    batches = _plan_batches(mine, len(source) * cfg.replicas, cfg.shard_size, cfg.batch_size)
    maker = _RecordMaker(source, cfg, job.size)
    loader = DataLoader(
        maker,
        batch_sampler=[b for _, b, _ in batches],
        num_workers=cfg.workers,
        collate_fn=functools.partial(_stacked, at=2),
    )
    mapping = None
    if source.labelled:
        try:
            mapping = map_classes(source.class_names, job.teacher.class_names, job.teacher.num_classes)[0]
        except MNv4Error:
            mapping = None
    bad = BadImageLog(verbose=info.is_main)
    n_mine = sum(len(b) for _, b, _ in batches)
    bar = tqdm(total=n_mine, desc=f"labelling {job.out.name}", unit="img", disable=_disable(job.progress, info))
    records: list[ShardRecord] = []
    stats, t_shard, written, labelled_now = _new_stats(ks), time.perf_counter(), 0, 0
    for (shard, _, last), loaded in zip(batches, loader):
        labelled_now += _add_batch(job, loaded, ks, mapping, records, stats, bad)
        bar.update(len(loaded[0]))
        if last:
            stats["shard"], stats["seconds"] = shard, round(time.perf_counter() - t_shard, 3)
            path = job.out / shard_name(shard)
            atomic_write_json(path.with_suffix(".stats.json"), stats)
            write_shard(path, records)  # after the stats: a shard that exists always has its stats
            written += 1
            bar.set_postfix(shards=f"{written}/{len(mine)}")
            records, stats, t_shard = [], _new_stats(ks), time.perf_counter()
    bar.close()
    return labelled_now, bad


def _add_batch(job: _Job, loaded: tuple, ks: list[int], mapping, records: list, stats: dict, bad: BadImageLog) -> int:
    """The teacher's probabilities for a batch's readable records, appended to ``records``; their number."""
    batch, images = loaded
    good = [item for item in batch if not isinstance(item[1], BadImage)]
    for item in batch:
        if isinstance(item[1], BadImage):
            bad.add(item[1])
            stats["skipped"] += 1
            stats["bad"][item[1].path] = item[1].reason
    if not good:
        return 0
    probs = job.teacher.probs(images)
    for k in ks:
        kl, same = truncation_cost(probs, k)
        stats["truncation"][str(k)]["kl_sum"] += float(kl.sum())
        stats["truncation"][str(k)]["top1_same"] += int(same.sum())
    kl16, _ = truncation_cost(probs, 0)
    stats["float16_kl_sum"] += float(kl16.sum())
    names = job.source.class_names
    for (j, data, _, meta), p, t in zip(good, probs, probs.argmax(1).tolist()):
        enc = encode_probs(p, job.cfg.top_k)
        records.append(ShardRecord(record_key(j), data, enc, meta))
        stats["jpeg_bytes"] += len(data)
        stats["probs_bytes"] += len(enc)
        if mapping is not None and "label" in meta:
            stats["label_agree"] += int(mapping[names.index(meta["label"])] == t)
    stats["records"] += len(good)
    return len(good)


def _new_stats(ks: list[int]) -> dict[str, Any]:
    return {
        "records": 0,
        "skipped": 0,
        "bad": {},
        "jpeg_bytes": 0,
        "probs_bytes": 0,
        "label_agree": 0,
        "float16_kl_sum": 0.0,
        "truncation": {str(k): {"kl_sum": 0.0, "top1_same": 0} for k in ks},
    }


def _write_manifest(cfg, out, n_shards, ident, teacher, source, policy, size, ks) -> dict[str, Any]:
    shards, totals = [], _new_stats(ks)
    seconds = 0.0
    for s in range(n_shards):
        path = out / shard_name(s)
        st = json.loads(path.with_suffix(".stats.json").read_text())
        shards.append(
            {"name": path.name, "records": st["records"], "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        )
        for key in ("records", "skipped", "jpeg_bytes", "probs_bytes", "label_agree", "float16_kl_sum"):
            totals[key] += st[key]
        totals["bad"].update(st["bad"])
        for k, v in st["truncation"].items():
            if k in totals["truncation"]:
                totals["truncation"][k]["kl_sum"] += v["kl_sum"]
                totals["truncation"][k]["top1_same"] += v["top1_same"]
        seconds += st["seconds"]
    n = max(totals["records"], 1)
    tar_bytes = sum(s["bytes"] for s in shards)
    check_file = out / "teacher_check.json"
    manifest = {
        "format": FORMAT,
        "version": 1,
        "teacher": {**teacher.identity, "class_names": teacher.class_names},
        "num_classes": teacher.num_classes,
        "class_names": teacher.class_names,
        "source": {**ident["source"], "class_names": source.class_names},
        "augmentation": policy.to_dict(),
        "replicas": cfg.replicas,
        "seed": cfg.seed,
        "image_size": size,
        "jpeg_quality": cfg.jpeg_quality,
        "labels": {
            "storage": f"top-{cfg.top_k}" if cfg.top_k else "float16",
            "top_k": cfg.top_k,
            "npy": "structured (values f2[k], indices i2|i4[k], rest f4)" if cfg.top_k else "f2[num_classes]",
        },
        "records": totals["records"],
        "skipped_records": totals["skipped"],
        "unreadable_images": sorted(totals["bad"]),
        "shard_size": cfg.shard_size,
        "shards": shards,
        "bytes": tar_bytes,
        "bytes_per_record": {
            "total": round(tar_bytes / n, 1),
            "jpeg": round(totals["jpeg_bytes"] / n, 1),
            "probabilities": round(totals["probs_bytes"] / n, 1),
            "tar_and_metadata": round((tar_bytes - totals["jpeg_bytes"] - totals["probs_bytes"]) / n, 1),
        },
        "label_seconds": round(seconds, 2),
        "truncation": {
            ("float16" if k == "0" else f"top-{k}"): {
                "top1_unchanged_pct": round(100.0 * v["top1_same"] / n, 4),
                "mean_kl": max(0.0, v["kl_sum"] / n),  # float error can make a zero KL a tiny negative
            }
            for k, v in totals["truncation"].items()
        },
        "float16_mean_kl": max(0.0, totals["float16_kl_sum"] / n),
        "teacher_check": json.loads(check_file.read_text()) if check_file.is_file() else None,
        "teacher_agrees_with_label_pct": (
            round(100.0 * totals["label_agree"] / n, 4) if source.labelled and totals["label_agree"] else None
        ),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _report(m: dict[str, Any], say, labelled_now: int, seconds: float, bad: BadImageLog) -> None:
    b = m["bytes_per_record"]
    rate = labelled_now / max(seconds, 1e-9)
    say(
        f"wrote {m['records']} records in {len(m['shards'])} shards ({m['bytes'] / 1e6:.1f} MB); this run "
        f"labelled {labelled_now} in {seconds:.0f} s ({rate:.1f} img/s)"
    )
    if m["skipped_records"]:
        say(f"skipped {m['skipped_records']} record(s): {len(m['unreadable_images'])} unreadable image(s)")
    say(
        f"bytes per record: {b['total']:.0f} (JPEG {b['jpeg']:.0f} + probabilities {b['probabilities']:.0f} + "
        f"tar headers and metadata {b['tar_and_metadata']:.0f})"
    )
    parts = []
    for name, v in m["truncation"].items():
        parts.append(f"{name}: top-1 unchanged on {v['top1_unchanged_pct']:.2f}%, mean KL {v['mean_kl']:.3g} nats")
    storage = m["labels"]["storage"]
    what = "stored" if storage != "float16" else "if stored as top-k instead of float16"
    say(f"probability storage cost ({what}; vs the teacher's float32): " + "; ".join(parts))
    if storage == "float16":
        say(f"float16 storage: mean KL {m['float16_mean_kl']:.3g} nats")
    agree = m.get("teacher_agrees_with_label_pct")
    if agree is not None:
        say(f"on the augmented records the teacher's top-1 matches the source label {agree:.2f}%")
