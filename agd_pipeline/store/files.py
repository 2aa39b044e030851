"""File-system helpers of the store: atomic JSON writes, removal, bytes on disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file, fsync it and rename it into place: readers see the old file
    or the new one, never half of one. A failed write (a full disk) leaves no temporary behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree (a symlink is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def folder_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file below a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
