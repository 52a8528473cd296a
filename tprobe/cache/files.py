"""Durable file writes shared by the cache: fsync a path, write a file atomically."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

__all__ = ["atomic_write", "fsync_all", "fsync_path", "temp_path"]


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder: so a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """``<name>.tmp@<host>@<pid>``: this process's private temp file for ``path``. The host is in the name
    because a store is shared by the nodes of a cluster, where pids repeat and a pid says nothing of
    another node's processes (:meth:`tprobe.cache.store.FeatureStore._clean_leftovers` removes only its
    own host's, of dead pids)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp@{socket.gethostname()}@{os.getpid()}")


def atomic_write(path: str | Path, write) -> None:
    """Write ``path`` through a private temp file (``write(tmp)``, :func:`temp_path`), fsync it, rename it
    into place, fsync the folder: readers see the old file or the whole new one, never a part. A write
    that fails (a full disk, a damaged input) removes its temp file and leaves ``path`` as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_all(paths: list[Path]) -> None:
    """fsync every path, the calls in flight together (threads: fsync releases the GIL); returns when all
    are done."""
    if len(paths) < 2:
        for p in paths:
            fsync_path(p)
        return
    list(_fsync_pool().map(fsync_path, paths))


_FSYNC_POOL = None
_FSYNC_POOL_LOCK = threading.Lock()


def _fsync_pool():
    global _FSYNC_POOL
    with _FSYNC_POOL_LOCK:
        if _FSYNC_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _FSYNC_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tprobe-fsync")
        return _FSYNC_POOL
