"""The format protocol: what the store asks of a shard format (Zarr group, WebDataset tar, ...).

A format writes a shard (``begin_shard`` -> ``write``/``finish``), finds a finished one on disk
(``shard_entry``, ``shard_header``), opens one for reading (``open_shard``: a ``ShardReader``, the
read protocol below, which every format's reader implements), checks one cheaply (``file_problems``,
``array_problems``), says how the loader reads one (``read_units``) and which files are its own
(``owns``, ``remove_shard``, ``bytes_on_disk``, ``shard_files``). StoreWriter, TrajectoryStore,
recovery, conversion and the loader only ever ask the format object (or the reader it opens); none
of them branches on a format's name or probes a reader's type.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Protocol, runtime_checkable

from ...errors import StoreError
from ..files import folder_bytes, remove_path
from ..schema import PARTIAL


@runtime_checkable
class ShardReader(Protocol):
    """The read side of one shard, whatever its format: what ``ShardFormat.open_shard`` returns
    and every reader of a store (TrajectoryStore, verify, convert, the training loader) relies on.

    ``array_keys()`` names the arrays the shard holds (derived ones included, see
    schema.DERIVED_ARRAYS); ``shard[name]`` is one of them, an array with ``shape``, ``dtype``,
    ``chunks`` and numpy slicing; ``prepare()`` does, once, whatever the reader would otherwise do
    lazily on first access (a tar reader indexes its members; a Zarr shard has nothing to do), so
    that a reader shared by several threads does it once, not in each."""

    def array_keys(self): ...

    def __getitem__(self, name: str): ...

    def prepare(self) -> None: ...


class ShardFormat(abc.ABC):
    """One on-disk form of a shard. Subclasses set the class attributes and implement the abstract
    methods; the others have defaults that fit most formats."""

    name: str  # the manifest's "format" and the codec table's column
    extension: str  # a shard is named shard-NNNNNN.<extension>
    # The codecs this format takes: codec name -> this format's form of it. The registry's codec
    # table (formats.CODECS, the compressor setting's choices) is the union over the formats.
    codecs: dict[str, object]
    default_compressor: str  # the codec "auto" means for this format (one of ``codecs``)
    reuse_open_shards: bool  # whether the loader keeps an opened shard for its next read units
    codec_note: str = ""  # why some codecs of the table are not available, if they are not

    def shard_name(self, index: int) -> str:
        return f"shard-{index:06d}.{self.extension}"

    def codec(self, compressor: str):
        """This format's form of a codec of the codec table."""
        return self.codecs[compressor]

    # ------------------------------------------------------------------ writing and finding

    def prepare_root(self, root: Path) -> None:
        """Write whatever a new store's root needs besides the manifest (nothing, by default);
        also called when shards are about to be written into an existing store."""
        return None

    def seal_root(self, root: Path) -> None:
        """Once every shard is complete: whatever the root needs so that standard tools open the
        whole store (Zarr: consolidated metadata; nothing, by default)."""
        return None

    def root_sealed(self, root: Path) -> bool:
        """Whether ``seal_root`` has run since shards were last written (always, by default)."""
        return True

    @abc.abstractmethod
    def begin_shard(self, store, index: int) -> ShardWriter:
        """A writer of shard ``index`` of ``store`` (a StoreWriter)."""

    @abc.abstractmethod
    def shard_entry(self, final: Path, header: dict, index: int) -> dict | None:
        """The manifest entry of a shard that is complete under its final name and belongs to the
        run ``header`` describes, else None."""

    @abc.abstractmethod
    def shard_header(self, path: Path) -> dict | None:
        """The run settings a shard on disk carries (to rebuild a lost manifest), or None."""

    # ---------------------------------------------------------------------------- reading

    @abc.abstractmethod
    def open_shard(self, path: Path, specs: dict[str, tuple[tuple, str]]) -> ShardReader:
        """The shard at ``path`` as a ``ShardReader``; ``specs`` (schema.array_specs) are the
        arrays the manifest says it holds."""

    def dask_array(self, array):
        """One array of an open shard as a dask array, chunked at the shard's own chunks."""
        import dask.array as da

        return da.from_array(array, chunks=array.chunks, asarray=True)

    @abc.abstractmethod
    def read_units(self, manifest, entry: dict) -> list[slice]:
        """The trajectory rows of a shard the loader (and conversion) reads at once."""

    def rows_where(self, entry: dict, array, start: int, stop: int) -> str:
        """Where trajectories [start, stop) of an array of an open shard lie on disk, for messages:
        its chunk rows, by default."""
        rows = max(1, array.chunks[0])
        first, last = start // rows, max(start, stop - 1) // rows
        return f"chunk row {first}" if first == last else f"chunk rows {first}-{last}"

    # ----------------------------------------------------------------------------- checks

    def file_problems(self, path: Path, entry: dict) -> list[str]:
        """Cheap checks of a shard before it is opened (a tar's size, ...)."""
        return []

    def array_problems(self, path: Path, name: str, array, entry: dict) -> list[str]:
        """Cheap checks of one array of an open shard beyond shape and dtype (Zarr's chunk files)."""
        return []

    def whole_shard_problem(self, shard) -> str | None:
        """Before a full re-read: a problem reading the open shard as a whole, if any."""
        return None

    # ------------------------------------------------------------------------------ files

    @abc.abstractmethod
    def owns(self, entry: Path) -> bool:
        """Whether an entry of a store folder is a shard of this format (or its temporary or
        companion files), holding nothing of the user's."""

    def bytes_on_disk(self, path: Path) -> int:
        return folder_bytes(path)

    def remove_shard(self, path: Path) -> None:
        """Remove a shard and its companion files."""
        remove_path(path)

    def shard_files(self, path: Path) -> list[Path]:
        """Every file that makes up a shard, companions included (what the record of a verified
        shard lists with sizes and modification times): the shard's file, or every file below its
        folder."""
        if path.is_file():
            return [path]
        return sorted(p for p in path.rglob("*") if p.is_file())


class ShardWriter(abc.ABC):
    """Writes one shard under ``<name>.partial``; ``finish`` re-reads it, compares it with the
    checksums of the values written and only then renames it into place (the commit point). Used
    as a context manager (``with store.begin_shard(i) as shard``), an error aborts it (``abort``).

    ``store`` is the StoreWriter: its ``root``, ``header``, ``shard_range`` and ``mark_complete``."""

    def __init__(self, store, index: int, fmt: ShardFormat):
        self.store, self.index = store, index
        self.start, self.stop = store.shard_range(index)
        self.final = store.root / fmt.shard_name(index)
        self.partial = store.root / (self.final.name + PARTIAL)
        remove_path(self.partial)  # a stale partial or shard of an earlier attempt
        fmt.remove_shard(self.final)
        self.written = 0

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()

    def abort(self) -> None:
        """After an error (a full disk, ...): close what the writer opened, without writing more,
        and remove its partial shard; nothing of the failed write is left behind. Never raises."""
        remove_path(self.partial)

    @abc.abstractmethod
    def write(self, offset: int, arrays: dict) -> None:
        """Write trajectories [offset, offset + n) of this shard (offset is shard-relative)."""

    @abc.abstractmethod
    def finish(self, expected_checksums: dict | None = None) -> dict:
        """Verify and publish the shard; return its manifest entry."""

    def check_all_written(self) -> None:
        expected = self.stop - self.start
        if self.written != expected:
            raise StoreError(f"{self.partial}: {self.written} of {expected} trajectories written")


def check_before_publish(partial: Path, stored: dict, written: dict, expected: dict | None) -> None:
    """The shard as stored must read back as the values written (and equal ``expected``, the
    source's checksums, when given); otherwise it is removed unpublished."""
    bad = sorted(k for k in written if stored.get(k) != written[k])
    if expected is not None:
        bad += sorted(k for k in expected if written.get(k) != expected[k] and k not in bad)
    if bad:
        remove_path(partial)
        raise StoreError(f"{partial}: arrays {bad} do not read back as written"
                         + (" / differ from the source" if expected is not None else "")
                         + "; the shard was not published (is the disk failing?)")
