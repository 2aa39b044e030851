"""Creating, resuming and repairing a store (stage one, and conversion).

A shard is written under ``<name>.partial``, re-read and compared with the checksums of the values
written, and only then renamed into place; the rename is the commit point, and the manifest
catches up: one line appended to its journal (manifest.log, journal.py), folded into manifest.json
(written to a temporary file and renamed) when the store is complete or the run ends. Every shard
carries the settings of its run and its checksums, so a lost manifest is rebuilt from the shards.
Trajectory i's seed, class and w depend on (run seed, i) only, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import StoreError
from .files import write_json_atomic
from .formats import SHARD_PATTERN, get_format, resolve_compressor
from .journal import append_entry, log_path, remove_log, repair_tail
from .manifest import Manifest, differences, new_manifest, read_manifest, recover_manifest
from .ownership import refuse_foreign_folder, remove_store
from .schema import MANIFEST, RUN_KEYS, SCHEMA_VERSION, STORE_TYPE, shard_range
from .verify import find_problems


class StoreWriter:
    """Creates or resumes a store. ``pending()`` lists the shards still to write.

    Several processes may write one store: process ``rank`` of ``world_size`` owns the shards whose
    index is ``rank`` modulo ``world_size`` (``owned``). Only rank 0 creates, recovers or replaces
    the manifest and appends to its journal; the others' finished shards are picked up from disk
    (``refresh``). The caller makes rank 0 open the store before the others do, and holds the
    folder's lock.
    """

    def __init__(self, root: str | os.PathLike, header: dict, rank: int = 0, world_size: int = 1,
                 restart_on_mismatch: bool = False, log=print):
        self.root = Path(root)
        fmt = header.get("format", "zarr")
        self.header = {"schema_version": SCHEMA_VERSION, "format": fmt, "bitround_keepbits": 0, **header}
        self.header["compressor"] = resolve_compressor(self.header.get("compressor"), fmt)
        self.header.pop("store_type", None)
        self.header.pop("shards", None)
        self.format = fmt
        self.shard_format = get_format(fmt)
        self.rank, self.world_size = rank, world_size
        self.log = log
        total, size = self.header["num_trajectories"], self.header["shard_size"]
        self.num_shards = -(-total // size)
        self._journal_checked = False  # whether a torn last line of the journal was looked for
        self.manifest = self._open(restart_on_mismatch)
        self._count_incomplete()

    def shard_range(self, index: int) -> tuple[int, int]:
        return shard_range(self.header, index)

    # --------------------------------------------------------------------- opening the folder

    def _open(self, restart_on_mismatch: bool) -> Manifest:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file: the out_dir of a trajectory store must be a folder")
        if self.rank != 0:
            return read_manifest(self.root)
        try:
            existing = self._existing()
        except StoreError as err:
            older = self._older_schema()
            if older is None:
                raise
            if not restart_on_mismatch:
                raise StoreError(f"{err}; or pass --restart-on-mismatch true to let this run replace it") from None
            remove_store(self.root, f"holds a store of schema version {older} (an older release)", self.log)
            existing = None
        if existing is not None:
            changed = differences({k: existing.get(k) for k in RUN_KEYS}, {k: self.header.get(k) for k in RUN_KEYS})
            if not changed:
                return existing
            details = "; ".join(changed)
            if not restart_on_mismatch:
                raise StoreError(
                    f"{self.root} holds a store written with other settings ({details}; store -> this run). "
                    "Resuming would mix two runs: choose another out_dir, delete this one to start over, or "
                    "pass --restart-on-mismatch true to let this run replace it.")
            remove_store(self.root, f"holds a store written with other settings ({details})", self.log)
        else:
            refuse_foreign_folder(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(self.header)
        remove_log(self.root)  # a journal of an earlier store is never replayed onto this one
        self.shard_format.prepare_root(self.root)
        self._write_manifest(manifest)
        return manifest

    def _older_schema(self) -> int | None:
        """The schema version of a store of ours written by an older release, else None."""
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        ours = isinstance(manifest, dict) and manifest.get("store_type") == STORE_TYPE  # a marker, or not ours
        return version if ours and isinstance(version, int) and version < SCHEMA_VERSION else None

    def _existing(self) -> Manifest | None:
        """The store already in the folder: its manifest, or one rebuilt from its shards when the
        manifest is missing or damaged. None for an empty folder or one without our shards."""
        path = self.root / MANIFEST
        if not self.root.exists():
            return None
        if path.exists():
            try:
                return read_manifest(self.root)
            except StoreError as err:
                if "schema version" in str(err) or "not a trajectory store" in str(err):
                    raise
                damaged = err
        else:
            damaged = None
        if not any(SHARD_PATTERN.fullmatch(p.name) for p in self.root.iterdir()):
            if damaged is not None:
                raise damaged
            return None
        manifest = recover_manifest(self.root, self.log)
        if manifest is None and damaged is not None:
            raise damaged
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        """The whole manifest as the snapshot, then the journal it holds removed (a crash between
        the two leaves lines the snapshot already has: replaying them changes nothing)."""
        try:
            write_json_atomic(self.root / MANIFEST, manifest)
            remove_log(self.root)
        except OSError as err:
            raise StoreError(f"{self.root / MANIFEST}: cannot write ({err.strerror or err})") from None

    def compact(self) -> None:
        """Fold the journal into manifest.json (rank 0; generate calls it when it ends), so the
        manifest is one plain JSON file again. Nothing is written when there is no journal."""
        if self.rank == 0 and log_path(self.root).exists():
            self._write_manifest(self.manifest)

    @contextlib.contextmanager
    def compacting(self):
        """A block after which the journal is compacted: when it ends, and as far as possible when
        it fails (readers replay the journal anyway, so an error there only leaves it)."""
        try:
            yield self
        except BaseException:
            with contextlib.suppress(OSError, StoreError):
                self.compact()
            raise
        self.compact()
        self.seal()

    def seal(self) -> None:
        """Rank 0, once every shard is complete: let the format finish the root for standard tools
        (Zarr: the hierarchy's metadata consolidated into the root's zarr.json)."""
        if self.rank == 0 and all(entry.get("status") == "complete" for entry in self.manifest.shards) \
                and not self.shard_format.root_sealed(self.root):  # a rerun with nothing to do writes nothing
            try:
                self.shard_format.seal_root(self.root)
            except OSError as err:
                raise StoreError(f"{self.root}: cannot write the root's metadata ({err.strerror or err}); "
                                 "the shards are complete, run the same command again to finish it") from None

    def _count_incomplete(self) -> None:
        self._incomplete = sum(entry.get("status") != "complete" for entry in self.manifest.shards)

    # ------------------------------------------------------------------ shards done and to do

    def entry_on_disk(self, index: int) -> dict | None:
        """The manifest entry of a shard that is complete under its final name, else None."""
        return self.shard_format.shard_entry(self.root / self.shard_format.shard_name(index), self.header, index)

    def refresh(self) -> list[int]:
        """Reconcile the manifest with the shards on disk; return the indices not complete.

        A shard renamed into place by a run that died before updating the manifest (or by another
        process) counts as complete; a shard the manifest lists but the disk lacks does not.
        """
        todo, changed = [], False
        for i, entry in enumerate(self.manifest.shards):
            listed = entry.get("status") == "complete"
            found = self.entry_on_disk(i) if not listed or not (self.root / entry["name"]).exists() else entry
            if found is None:
                todo.append(i)
                if listed:
                    self.manifest.shards[i] = {k: v for k, v in entry.items() if k in (
                        "name", "first_trajectory", "trajectories")} | {"status": "pending"}
                    changed = True
            elif not listed:
                self.manifest.shards[i] = found
                changed = True
        if changed and self.rank == 0:
            self._write_manifest(self.manifest)
        self._count_incomplete()
        return todo

    def pending(self, verify: str = "cheap") -> list[int]:
        """Shards still to write: those not complete on disk, plus those of ours that fail the
        check (``cheap``: presence, shapes, every chunk file and its size; ``full``: every array
        re-read against its checksum), whose files are removed so they are written again."""
        todo = set(self.refresh())
        done = [i for i in self.owned(range(self.num_shards)) if i not in todo]
        names = {self.shard_format.shard_name(i): i for i in done}
        found = find_problems(self.root, self.manifest, full=verify == "full", only=set(names))
        damaged = {names[p.shard] for p in found}
        for index in sorted(damaged):
            name = self.shard_format.shard_name(index)
            self.log(f"{self.root / name}: damaged "
                     f"({'; '.join(str(p) for p in found if p.shard == name)}); writing it again")
            self.shard_format.remove_shard(self.root / name)
        if damaged:
            self.refresh()
        if (todo or damaged) and self.rank == 0:
            self.shard_format.prepare_root(self.root)  # the root's list of shards, if sealed, is stale now
        return sorted(todo | damaged)

    def owned(self, indices) -> list[int]:
        return [i for i in indices if i % self.world_size == self.rank]

    # ---------------------------------------------------------------------------- writing

    def begin_shard(self, index: int):
        """A writer of shard ``index``: ``write(offset, arrays)``, then ``finish()``."""
        return self.shard_format.begin_shard(self, index)

    def mark_complete(self, index: int, entry: dict) -> None:
        """Record a published shard: one line appended to the journal (rank 0), whatever the size
        of the store; the whole manifest is written once the last shard is in."""
        if self.manifest.shards[index].get("status") != "complete":
            self._incomplete -= 1
        self.manifest.shards[index] = entry
        if self.rank != 0:
            return
        try:
            if not self._journal_checked:
                repair_tail(self.root)
                self._journal_checked = True
            append_entry(self.root, entry)
        except OSError as err:
            raise StoreError(f"{log_path(self.root)}: cannot write ({err.strerror or err})") from None
        if self._incomplete == 0:
            self.compact()
