"""Writing files without ever losing data: atomic writes, output-folder locks, orphan clean-up.

* :func:`atomic_write` writes to a temporary file in the destination folder and renames it over the
  target, so a crash or kill never leaves a half-written checkpoint, export or report. The file gets
  the permissions the process umask allows (like ``open()``), not the private mode of a temp file.
* :class:`DirLock` makes one process the owner of an output folder (a run, a labelled dataset, a
  search). A second writer gets one clear error naming the owner; a lock left by a dead process is
  taken over.
* :func:`remove_orphan_temps` deletes temporary files that a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import MNv4Error

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "DirLock",
    "FolderLocked",
    "remove_orphan_temps",
    "TEMP_SUFFIX",
    "read_mapping",
    "read_record",
    "preset_or_file",
]

TEMP_SUFFIX = ".tmp"
_TEMP_PREFIX = "."
LOCK_NAME = ".mnv4.lock"


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (single-threaded at this point).
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any error the temp file is removed.

    The temp file is named ``.<name>.<pid>.<random>.tmp`` next to ``path`` (same filesystem, so the
    rename is atomic); :func:`remove_orphan_temps` recognises these by the pid of their writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if Path(tmp).is_file():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; honour the umask like open() does
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output_path(path: str | os.PathLike, field: str, folder: bool = False) -> Path:
    """``path`` if a file (``folder``: a folder) can be written there, else one error naming ``field``, so a
    command fails before its work rather than after it: a file where a folder is needed (on the way or at
    the end), a folder where a file goes, or a place this user cannot write to."""
    from .errors import MNv4Error

    path = Path(path)
    what = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise MNv4Error(f"`{field}` {path} is {kind}, not a {what}; choose another path")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MNv4Error(f"`{field}` {path}: {parent} is a file, so no {what} can be made under it; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MNv4Error(f"`{field}` {path}: {parent} is not writable by this user; choose another path")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_mapping(path: str | os.PathLike, what: str, holds: str) -> dict[str, Any]:
    """A YAML or JSON file (by suffix: ``.json`` is JSON, anything else YAML) that must hold a mapping;
    every failure is one MNv4Error naming the file. ``what`` names the file ("config file"), ``holds``
    what the mapping should contain ("name, stem, stages, ...")."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MNv4Error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise MNv4Error(f"{what} {path} is a folder; pass the file") from None
    except OSError as e:
        raise MNv4Error(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MNv4Error(f"{what} {path} is not a text file (YAML or JSON); pass the {what}") from None
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise MNv4Error(f"{path} is not valid {'JSON' if is_json else 'YAML'} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise MNv4Error(f"{path} must hold a mapping ({holds})")
    return data


_T = TypeVar("_T")
_RECORD_SUFFIXES = (".yaml", ".yml", ".json")


def read_record(path: str | os.PathLike, cls: type[_T], what: str, holds: str) -> _T:
    """The record ``cls.from_dict`` makes of a YAML/JSON file (:func:`read_mapping`), its ``name``
    defaulting to the file's stem. ``what`` names the record ("hardware profile")."""
    data = read_mapping(path, f"{what} file", holds)
    data.setdefault("name", Path(path).stem)
    return cls.from_dict(data)  # type: ignore[attr-defined]


def preset_or_file(
    value: str | os.PathLike | _T, cls: type[_T], presets: Mapping[str, _T], what: str, holds: str
) -> _T:
    """``value`` itself when it is a ``cls`` already, the preset of that name, or the record of a
    .yaml/.yml/.json file (:func:`read_record`); anything else is one MNv4Error listing the presets."""
    if isinstance(value, cls):
        return value
    key = str(value)
    if key in presets:
        return presets[key]
    if Path(key).suffix.lower() not in _RECORD_SUFFIXES:
        raise MNv4Error(f"unknown {what} {key!r}; built in: {', '.join(presets)} (or a .yaml/.json file)")
    return read_record(key, cls, what, holds)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphan_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete ``atomic_write`` temp files (and folders named the same way) in ``folder`` whose writer process
    no longer runs; with ``name``, only those of the file ``name`` (a user's folder holds other files)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    start = _TEMP_PREFIX if name is None else f"{_TEMP_PREFIX}{name}."
    for p in folder.iterdir():
        if not (p.name.startswith(start) and p.name.endswith(TEMP_SUFFIX)):
            continue
        parts = p.name.split(".")
        pid = next((int(x) for x in reversed(parts[:-2]) if x.isdigit()), -1)
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


class FolderLocked(MNv4Error):
    """Another live process owns the folder."""


class DirLock:
    """Exclusive ownership of an output folder for the life of one process (or one ``with`` block).

    The lock is a file ``.mnv4.lock`` holding the owner's pid, host and command line, created with
    ``O_EXCL`` so two processes cannot both win. A lock whose pid is dead on this host is stale and
    is taken over (the owner was killed). Re-acquiring a lock this process already holds is a no-op.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> DirLock:
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "cmd": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written right now, or garbage: give the writer a moment
                    time.sleep(0.05)
                    owner = self._owner()
                if owner and owner.get("pid") == os.getpid() and owner.get("host") == me["host"]:
                    self.held = True
                    return self
                same_host = owner is not None and owner.get("host") == me["host"]
                if owner is None or (same_host and not _pid_alive(int(owner.get("pid", -1)))):
                    self.path.unlink(missing_ok=True)  # stale: its owner was killed
                    continue
                raise FolderLocked(
                    f"{self.folder} is in use by another {self.what} (pid {owner.get('pid')} on {owner.get('host')}, "
                    f"started {time.strftime('%Y-%m-%d %H:%M', time.localtime(owner.get('since', 0)))}); "
                    f"wait for it to finish or choose another output folder"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FolderLocked(f"could not lock {self.folder}; remove {self.path} if no {self.what} is using it")

    def release(self) -> None:
        if not self.held:
            return
        owner = self._owner()
        if owner is None or owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
