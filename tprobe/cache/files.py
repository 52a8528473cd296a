"""Durable file writes shared by the cache: fsync a path, write a file atomically."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_path"]


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder: so a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Write ``path`` through a private temp file (``write(tmp)``), fsync it, rename it into place, fsync
    the folder: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
