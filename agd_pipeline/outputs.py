"""Output folders that a stage replaces as a whole (a model folder): refuse a folder the stage did not
write, and swap the new one in so that a killed run leaves the previous one whole."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelError


def check_replaceable(out: Path, key: str, description_prefix: str, entries: set[str], what: str) -> None:
    """Refuse, before any work, to replace ``out`` unless it is missing, empty, or this stage's own
    earlier output: an agd_base.json whose description starts with ``description_prefix`` and
    nothing outside ``entries``."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        meta = json.loads((out / "agd_base.json").read_text())
        ours = isinstance(meta, dict) and str(meta.get("description", "")).startswith(description_prefix)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False  # missing or unreadable: not provably this stage's folder
    foreign = sorted(p.name for p in out.iterdir() if p.name not in entries)
    if not ours or foreign:
        why = f"it holds {', '.join(foreign[:3])}" if ours else f"it is not {what} (no agd_base.json saying so)"
        raise ModelError(f"{key}: {out} exists and {why}; nothing was changed. Choose another folder, or move "
                         "that one away")


def staging_folder(out: Path) -> Path:
    """An empty folder next to ``out`` to assemble the new output in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` (empty, missing, or checked by :func:`check_replaceable`) by ``staging``."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)
