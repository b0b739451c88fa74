"""Atomic writes: every file lmforge produces appears whole or not at all (temp file in the same folder, fsync,
rename). A crash or Ctrl-C mid-write leaves the previous version, never a truncated one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual permissions
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # a writer that replaced the file (safetensors: 0600) gets them too
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it replaces `path` (an old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: str | Path, path: str | Path) -> None:
    """Put the finished temporary folder `tmp` (beside `path`, named as `is_stale_temp` expects) in place of
    `path`: its files on disk first, then one rename. atomic_dir ends with this; a folder that several processes
    fill (a sharded checkpoint) calls it from one of them once all are done."""
    tmp, path = Path(tmp), Path(path)
    _settle(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _settle(folder: Path) -> None:
    """Before a folder is renamed into place: every file in it gets the umask's mode (safetensors writes 0600)
    and is on disk, and so is the folder's own entry list, so a power cut cannot leave a renamed folder whose
    files are empty."""
    mode = 0o666 & ~_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            f = Path(root) / name
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def is_stale_temp(p: Path) -> bool:
    """Whether `p` is what an interrupted atomic write leaves (`.NAME.*.tmp`, `.NAME.old`): never a result."""
    return p.name.startswith(".") and p.name.endswith((".tmp", ".old"))


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete what an interrupted atomic write left in `folder` (`.NAME.*.tmp` files and folders, `.NAME.old`
    folders): they are never a valid result. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.iterdir():
        if is_stale_temp(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be one: an existing file, a path under a file, or a
    place this process cannot write. Creates nothing (a probe file is made and removed at once)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a folder; give a folder path (it will be created)")
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise ConfigError(f"{flag} {p} lies under {q}, which is a file; choose a path under a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmforge-write-check.", suffix=".tmp", dir=q)  # (a stale temp)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {p}: cannot write in {q} ({e.strerror}); choose a folder you can write to") from None
    return p


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """As check_out_dir, for an output file: refuses a folder, a path under a file, an unwritable place."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file path")
    check_out_dir(p.parent, flag)
    return p


def save_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomic save through a function that writes to a given path (e.g. safetensors' save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
