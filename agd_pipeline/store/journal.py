"""The manifest's journal, ``manifest.log``: what stage one committed since manifest.json was last
written whole, so that a commit costs the same at 40,000 shards as at 10.

manifest.json is the snapshot. Each shard's completion appends one line to the log, the shard's
manifest entry as JSON (append, flush, fsync). Readers replay the log over the snapshot, line by
line (a later line wins; a line already in the snapshot changes nothing, so a crash between
writing a new snapshot and removing the log is harmless). The writer folds the log into a new
snapshot and removes it whenever it writes the manifest whole anyway, and when the store is
complete or generate ends, so a finished store is one plain JSON manifest again.

A writer killed mid-append leaves a torn last line: readers ignore it (the shard itself is on
disk under its final name, and the next run adopts it), and the next writer cuts it off before
appending. Any other line that is not a valid entry of a shard the manifest lists is damage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import StoreError
from .formats import SHARD_PATTERN

MANIFEST_LOG = "manifest.log"


def log_path(root: str | os.PathLike) -> Path:
    return Path(root) / MANIFEST_LOG


def append_entry(root: Path, entry: dict) -> None:
    """Append one shard's entry: O(1) whatever the size of the store."""
    with open(log_path(root), "a") as f:
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove_log(root: Path) -> None:
    log_path(root).unlink(missing_ok=True)


def repair_tail(root: Path) -> None:
    """Before a writer's first append: end a last line that a killed writer left without its
    newline, or cut it off when it is torn (otherwise the next line would be appended to it)."""
    try:
        f = open(log_path(root), "rb+")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start, position = 0, size
        while position > 0:  # back to the start of the last line
            step = min(1 << 16, position)
            position -= step
            f.seek(position)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                start = position + newline + 1
                break
        f.seek(start)
        if _parse(f.read()) is not None:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")  # a whole entry that only lacks its newline: kept
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def _parse(line: bytes):
    try:
        return json.loads(line)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both
        return None


def replay(root: Path, manifest: dict, fail) -> dict:
    """``manifest`` (a validated snapshot) with the log's entries applied, in order. ``fail(path,
    what)`` makes the StoreError for a damaged line."""
    path = log_path(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return manifest
    except OSError as err:
        raise StoreError(f"{path}: cannot read ({err.strerror or err})") from None
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    shards = manifest["shards"]
    for position, (number, line) in enumerate(lines):
        entry = _parse(line)
        if entry is None:
            if position == len(lines) - 1:
                break  # torn by a writer killed mid-append
            raise fail(path, f"line {number} is not JSON")
        name = entry.get("name") if isinstance(entry, dict) else None
        match = SHARD_PATTERN.fullmatch(name) if isinstance(name, str) else None
        index = int(match.group(1)) if match else -1
        if not 0 <= index < len(shards) or shards[index].get("name") != name:
            raise fail(path, f"line {number} is an entry of {name!r}, which the manifest does not list")
        slot = shards[index]
        if (entry.get("first_trajectory"), entry.get("trajectories")) != (slot.get("first_trajectory"),
                                                                          slot.get("trajectories")):
            raise fail(path, f"line {number}: shard {name} has the wrong trajectory range")
        if entry.get("status") != "complete":
            raise fail(path, f"line {number}: shard {name} has status {entry.get('status')!r}, expected 'complete'")
        if not (isinstance(entry.get("checksum"), str) and isinstance(entry.get("checksums"), dict)):
            raise fail(path, f"line {number}: shard {name} is complete but has no checksums")
        shards[index] = entry
    return manifest
