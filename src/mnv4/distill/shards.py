"""Soft-label shards: WebDataset-style tar files, one group of members per record.

A record with key ``0000001234`` is three members of a shard ``shard-000001.tar``:

* ``0000001234.jpg``  the augmented image after the JPEG round trip, exactly the bytes the teacher's
  input was decoded from (the student decodes the same bytes);
* ``0000001234.npy``  the teacher's probabilities: a float16 vector over all classes, or for top-k a
  structured scalar with fields ``values`` (float16[k]), ``indices`` (int16/int32[k]) and ``rest``
  (float32: the probability mass outside the top k);
* ``0000001234.json`` where the record came from: source image id, replica, label (if any), the
  augmentation's parameters (crop box, mixing partner and weight).

Tar headers are fixed (mtime 0, uid/gid 0, mode 0644), so a shard's bytes depend only on its records
and a resumed run ends with byte-identical shards. Any tar reader, ``webdataset`` included, reads them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MNv4Error
from ..files import atomic_write

__all__ = [
    "ShardRecord",
    "write_shard",
    "ShardIndex",
    "encode_probs",
    "decode_probs",
    "topk_dtype",
    "shard_name",
    "record_key",
]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_key(index: int) -> str:
    return f"{index:010d}"


def topk_dtype(k: int, num_classes: int) -> np.dtype:
    idx = "<i2" if num_classes <= 32767 else "<i4"
    return np.dtype([("values", "<f2", (k,)), ("indices", idx, (k,)), ("rest", "<f4")])


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_probs(probs: torch.Tensor, top_k: int = 0) -> bytes:
    """One record's probabilities (float [C]) as .npy bytes: all of them in float16, or the top k."""
    p = probs.detach().float().cpu()
    if top_k <= 0 or top_k >= p.numel():
        return _npy(p.numpy().astype("<f2"))
    vals, idx = p.topk(top_k)
    rec = np.zeros((), dtype=topk_dtype(top_k, p.numel()))
    rec["values"] = vals.numpy().astype("<f2")
    rec["indices"] = idx.numpy()
    rec["rest"] = max(0.0, 1.0 - float(vals.sum()))
    return _npy(rec)


def decode_probs(data: bytes, num_classes: int) -> np.ndarray:
    """.npy bytes -> float32 probabilities over ``num_classes``. A top-k record spreads its remaining mass
    evenly over the classes outside the top k (the maximum-entropy completion); the result sums to 1."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype.names is None:
        out = arr.astype(np.float32)
        if out.shape != (num_classes,):
            raise MNv4Error(f"a record holds {out.shape[0]} probabilities, the dataset says {num_classes} classes")
    else:
        vals = arr["values"].astype(np.float32)
        idx = arr["indices"].astype(np.int64)
        others = num_classes - len(idx)
        out = np.full(num_classes, float(arr["rest"]) / others if others > 0 else 0.0, dtype=np.float32)
        out[idx] = vals
    return out / out.sum()  # float16 rounding leaves the sum off 1 by up to ~1e-3


@dataclass
class ShardRecord:
    key: str
    jpeg: bytes
    probs: bytes  # .npy
    meta: dict[str, Any]


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def write_shard(path: str | os.PathLike, records: list[ShardRecord]) -> Path:
    """Write ``records`` as one tar, atomically (a killed writer leaves no partial shard)."""

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in records:
                meta = json.dumps(r.meta, sort_keys=True, separators=(",", ":")).encode()
                for suffix, data in ((".jpg", r.jpeg), (".npy", r.probs), (".json", meta)):
                    tar.addfile(_info(r.key + suffix, len(data)), io.BytesIO(data))

    return atomic_write(path, write)


class ShardIndex:
    """Random access to the records of shards: (shard, offset, size) of each record's members.

    File handles are opened lazily per process, so a dataset holding an index can be used by forked
    DataLoader workers.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self.keys: list[str] = []
        self._where: list[tuple[int, int, int, int, int, int, int]] = []  # shard, jpg off/len, npy, json
        for s, p in enumerate(self.paths):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(p, "r:") as tar:
                    for m in tar:
                        if m.isfile():
                            key, _, ext = m.name.partition(".")
                            members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as e:
                raise MNv4Error(f"cannot read shard {p}: {e}; label it again (delete the file to redo it)") from None
            for key in sorted(members):
                parts = members[key]
                if "jpg" not in parts or "npy" not in parts:
                    raise MNv4Error(f"shard {p}: record {key} lacks its .jpg or .npy; label it again")
                j, n, m = parts["jpg"], parts["npy"], parts.get("json", (0, 0))
                self.keys.append(key)
                self._where.append((s, j[0], j[1], n[0], n[1], m[0], m[1]))
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise MNv4Error(f"shard {self.paths[shard]} is truncated; label it again")
        return data

    def jpeg(self, i: int) -> bytes:
        s, jo, jl, *_ = self._where[i]
        return self._read(s, jo, jl)

    def probs(self, i: int) -> bytes:
        s, _, _, no, nl, _, _ = self._where[i]
        return self._read(s, no, nl)

    def meta(self, i: int) -> dict[str, Any]:
        s, *_, mo, ml = self._where[i]
        return json.loads(self._read(s, mo, ml)) if ml else {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
