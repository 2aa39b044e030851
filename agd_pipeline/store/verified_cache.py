"""The record of shards verified in full: a cache outside the store, so that a store re-read once
is not re-read at every start of stage two. (The checks themselves are in ``verify``; this module
was ``verified``, a name still importable.)

After a shard passes a full re-read, its record holds the manifest's checksum of it, a digest of
its manifest entry and array shapes, and a digest of the listing of every file that makes up the
shard (relative path, size, modification time in ns; the format says which files:
``ShardFormat.shard_files``). A later check trusts a shard whose record matches exactly; any
difference (a file added, removed, resized or touched, another entry) means a re-read.

Why a listing is enough, though bytes changed in place with the modification time put back (or
flipped by the disk itself) leave it as it was: the record only decides whether a shard is re-read
*before* training. Damaged bytes cannot get through that way, because the loader checks every unit
it reads against a digest of its content recorded when the shard was written (``unit_checksums``
in the manifest entry; the arrays it reads whole against their checksums; schema.py, verify.
read_problem), at no extra pass over the data: such a shard stops training at its first damaged
unit, naming it. Keying the record on a content digest instead would mean reading every shard at
every start, which is what the record exists to avoid. A shard written before read-time digests
(an entry without ``unit_checksums``) is therefore never trusted from its record: "changed"
re-reads it at every start. Only a full re-read (``train.verify full``, ``stages.inspect
--verify``) finds such damage before training starts, and in arrays the loader does not read.

The record never lives in the store (a DVC output, and train only holds a shared lock on it):
one JSON file per store, named by a hash of its resolved path, under ``verified/`` of
``$AGD_CACHE_DIR``, else ``$XDG_CACHE_HOME/agd-pipeline``, else ``~/.cache/agd-pipeline``. It is
written to a uniquely named temporary and renamed into place, so two runs at once never corrupt
it (the last one's records win); an unreadable file counts as empty, and a folder that cannot be
written costs a warning and the re-reads next time, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

CACHE_ENV = "AGD_CACHE_DIR"
RECORD_VERSION = 1
# A file modified within this long before its listing is not recorded: on a coarse file-system
# clock, a second change within the same tick would keep its modification time.
RACY_NS = 50_000_000
_warned: set[str] = set()


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "agd-pipeline"
    return Path.home() / ".cache" / "agd-pipeline"


def record_file(root: str | os.PathLike) -> Path:
    """The cache file of the store at ``root`` (by its resolved absolute path)."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def entry_digest(entry: dict, specs: dict) -> str:
    """What the manifest says of a shard: its entry and the shapes and dtypes its arrays must have."""
    text = json.dumps([entry, {k: [list(shape), dtype] for k, (shape, dtype) in specs.items()}], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Listing:
    """The files of one shard as they are now: a digest of (relative path, size, mtime) of each."""

    def __init__(self, root: Path, fmt, name: str):
        started = time.time_ns()
        digest, self.files, newest = hashlib.sha256(), 0, 0
        prefix = os.path.join(os.fspath(root), "")
        for path in fmt.shard_files(root / name):
            text = os.fspath(path)
            stat = os.stat(text)
            relative = text[len(prefix):] if text.startswith(prefix) else path.relative_to(root).as_posix()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            self.files += 1
            newest = max(newest, stat.st_mtime_ns)
        self.digest = digest.hexdigest()
        self.settled = newest < started - RACY_NS

    def __eq__(self, other) -> bool:
        return isinstance(other, Listing) and (self.digest, self.files) == (other.digest, other.files)


class VerifiedShards:
    """The records of one store: ``matches`` a shard as it is now, ``record`` or ``forget`` one,
    then ``save`` (merged with what another run may have saved meanwhile)."""

    def __init__(self, root: str | os.PathLike, log=None):
        self.root = Path(root)
        self.log = log
        try:
            self.path = record_file(root)
        except RuntimeError:  # no home folder for ~/.cache (and no AGD_CACHE_DIR): nothing recorded
            self.path = None
        self.records = self._load()
        self.recorded: dict[str, dict] = {}
        self.forgotten: set[str] = set()

    def _load(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent, unreadable or malformed: nothing recorded
            return {}
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION or not isinstance(
                data.get("shards"), dict):
            return {}
        return {name: record for name, record in data["shards"].items() if isinstance(record, dict)}

    def matches(self, name: str, entry: dict, specs: dict, listing: Listing) -> bool:
        record = self.records.get(name)
        return record is not None and record.get("checksum") == entry.get("checksum") \
            and record.get("entry") == entry_digest(entry, specs) \
            and record.get("files") == listing.files and record.get("listing") == listing.digest

    def record(self, name: str, entry: dict, specs: dict, listing: Listing) -> None:
        self.recorded[name] = {"checksum": entry.get("checksum"), "entry": entry_digest(entry, specs),
                               "files": listing.files, "listing": listing.digest}
        self.forgotten.discard(name)

    def forget(self, name: str) -> None:
        self.recorded.pop(name, None)
        if name in self.records:
            self.forgotten.add(name)

    def save(self, keep: set[str] | None = None) -> None:
        """Write the records (those of shards named in ``keep``, when given) atomically. A folder
        that cannot be written is warned about once per process."""
        if not self.recorded and not self.forgotten:
            return
        shards = self._load()  # another run may have saved since this one read the file
        shards.update(self.recorded)
        for name in self.forgotten:
            shards.pop(name, None)
        if keep is not None:
            shards = {name: record for name, record in shards.items() if name in keep}
        data = {"version": RECORD_VERSION, "store": str(self.root.resolve()), "shards": shards}
        tmp = None
        try:
            if self.path is None:
                raise OSError("no home folder; set AGD_CACHE_DIR")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            folder = str(self.path.parent) if self.path is not None else "~/.cache/agd-pipeline"
            if folder not in _warned:
                _warned.add(folder)
                message = (f"warning: cannot write the verification cache {folder} ({err.strerror or err}); "
                           f"shards verified now will be re-read next time (set {CACHE_ENV} to a writable folder)")
                if self.log is not None:
                    self.log(message)
                else:
                    warnings.warn(message, stacklevel=2)
            return
        self.records = shards
        self.recorded, self.forgotten = {}, set()
