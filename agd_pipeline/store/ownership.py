"""Which files of a store folder are ours: a folder holding anything else is the user's, never
written into as a new store and never deleted (see DESIGN.md, "Data safety rules")."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import StoreError
from ..locks import LOCK_FILE
from .files import folder_bytes, remove_path
from .formats import FORMATS, SHARD_PATTERN
from .journal import MANIFEST_LOG
from .schema import MANIFEST

# Ours whatever the format: the manifest, its temporary, its journal, the lock, and the damaged
# manifests and journals that earlier releases kept inside the store (recovery now keeps them next
# to the store folder: manifest.damaged_copy).
OWN_FILES = (MANIFEST, MANIFEST + ".tmp", MANIFEST_LOG, LOCK_FILE)
DAMAGED_MANIFEST = re.compile(rf"({re.escape(MANIFEST)}|{re.escape(MANIFEST_LOG)})\.damaged(-\d+)?")


def is_ours(entry: Path) -> bool:
    if entry.name in OWN_FILES or (entry.is_file() and DAMAGED_MANIFEST.fullmatch(entry.name)):
        return True
    return any(fmt.owns(entry) for fmt in FORMATS.values())


def foreign_entries(root: Path) -> list[str]:
    """Names in a store folder that are not ours: our files are the manifest, its temporaries and
    its journal, the lock, and each format's own (Zarr: the root group's zarr.json and shard folders
    holding only zarr.json and array folders; WebDataset: tars, their sidecars and partials)."""
    return [entry.name + ("/" if entry.is_dir() else "") for entry in sorted(root.iterdir()) if not is_ours(entry)]


def refuse_foreign_folder(root: Path) -> None:
    """A folder that holds files but no store is someone else's: refused before anything (not
    even a lock file) is written into it."""
    root = Path(root)
    if root.is_dir() and not (root / MANIFEST).exists():
        foreign = foreign_entries(root)
        if foreign:
            raise StoreError(f"{root} exists, is not empty ({', '.join(foreign[:5])}) and holds no trajectory "
                             "store: refusing to write a store into it; choose another out_dir")


def remove_store(root: Path, reason: str, log=print) -> None:
    """Delete a store that is provably ours (a valid marker, or shards only) and nothing else: a
    folder holding any file of the user's is refused, naming the files."""
    foreign = foreign_entries(root)
    if foreign:
        raise StoreError(
            f"{root} {reason}, but it also holds files that are not part of a trajectory store "
            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): refusing to delete anything. "
            "Move those files away or choose another out_dir.")
    ours = [p for p in sorted(root.iterdir()) if p.name != LOCK_FILE]
    shards = [p for p in ours if SHARD_PATTERN.fullmatch(p.name)]
    size = sum(folder_bytes(p) for p in ours)
    log(f"{root}: {reason}; removing it as asked (restart_on_mismatch): {len(shards)} shard(s) and "
        f"{len(ours) - len(shards)} other file(s) of the store, {size / 2**20:.1f} MiB")
    for path in ours:
        remove_path(path)
