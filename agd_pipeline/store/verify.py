"""Checks of a store's shards against its manifest: cheap ones (presence, shapes and dtypes, and
each format's own: a tar's size, Zarr's chunk files and bytes) or a full re-read of every array
against its checksums (and for NaN/inf), and the derived arrays outside the checksums (coordinates,
prompt text) against what the manifest implies; shards are checked in a few threads, and those re-read
before and unchanged since can be skipped (the verification cache, ``verified_cache``). Whatever ran
before, the loader checks what it reads against the digests recorded at write time
(``read_problem``), so none of these checks is the last line of defence against changed bytes."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import open_shard
from .schema import (DERIVED_ARRAYS, UNIT_CHECKSUMS, UNIT_ROWS, array_checksum, array_specs, combined_checksum,
                     prompt_texts, read_by_unit, row_slices, unit_checksum, unit_checksums, whole_checksum)
from .verified_cache import Listing, VerifiedShards

# How a store is verified (train.verify): "changed" re-reads the shards without a matching record
# of an earlier full re-read, "full" re-reads all, "cheap" re-reads none. Both re-reading modes
# record the shards that pass.
VERIFY_MODES = ("changed", "full", "cheap")


@dataclass
class Problem:
    shard: str
    array: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}/{self.array}" if self.array else self.shard
        return f"{where}: {self.message}"


def find_problems(root: Path, manifest, full: bool = False, only: set[str] | None = None,
                  mode: str | None = None, log=None) -> list[Problem]:
    """Every way the shards of ``manifest`` (a Manifest; or the ``only`` ones) disagree with it,
    in shard order. ``full`` re-reads all data instead of the cheap per-array checks: it catches
    everything they do and bytes changed in place; the verification cache is neither read nor
    written. ``mode`` (one of VERIFY_MODES) instead: "cheap" as ``full=False``; "full" re-reads
    every shard and records those that pass; "changed" re-reads only the shards without a
    matching record (whose files and entry are exactly as when they passed: that comparison, of
    every file's size and modification time, stands in for their cheap checks; bytes changed behind
    an unchanged listing are caught by the loader's read-time digests, see ``verified_cache``). ``log``
    gets one line on what was re-read."""
    if mode is not None and mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r}; allowed: {', '.join(VERIFY_MODES)}")
    reread = full if mode is None else mode != "cheap"
    cache = VerifiedShards(root, log) if mode in ("changed", "full") else None
    trusted = cache if mode == "changed" else None
    entries = [e for e in manifest.shards if only is None or e["name"] in only]
    began = time.perf_counter()
    # first what needs no opening, in this thread (a record's match is a few stat calls, faster
    # here than handed between threads); then the shards to open and read, in a few threads
    results, to_open = [], []
    for position, entry in enumerate(entries):
        result, listing = _before_opening(root, manifest, entry, reread, trusted)
        results.append(result)
        if result is None:
            to_open.append((position, entry, listing))

    def check(item):
        position, entry, listing = item
        return position, _opened(root, manifest, entry, reread, listing)

    if len(to_open) > 1:  # zarr's codecs, hashlib and file reads release the GIL
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            done = list(pool.map(check, to_open))
    else:
        done = [check(item) for item in to_open]
    for position, result in done:
        results[position] = result
    outcomes = [outcome for _, outcome, _ in results]
    if cache is not None:
        for entry, (problems, outcome, record) in zip(entries, results):
            if record is not None:
                cache.record(entry["name"], *record)
            elif problems or outcome == "re-read":  # damaged, or changed while it was read
                cache.forget(entry["name"])
        cache.save(keep={e["name"] for e in manifest.shards} if only is None else None)
    if log is not None and reread:
        skipped, read = outcomes.count("skipped"), outcomes.count("re-read")
        seconds = time.perf_counter() - began
        if mode == "changed":
            older = sum(1 for e in entries if e.get("status") == "complete" and UNIT_CHECKSUMS not in e)
            note = (f"; {older} written before read-time digests are re-read at every start (write the store "
                    "again with this release to record them)") if older else ""
            log(f"store: {skipped} shard(s) verified earlier and unchanged, {read} re-read ({seconds:.1f} s){note}")
        else:
            log(f"store: {read} shard(s) re-read against their checksums ({seconds:.1f} s)")
    return [problem for problems, _, _ in results for problem in problems]


# A shard's result: (problems, outcome, record). outcome: "skipped" (a matching record), "re-read"
# or None (not re-read); record, for a shard re-read without problems and unchanged meanwhile: the
# arguments of VerifiedShards.record.


def _before_opening(root: Path, manifest, entry: dict, reread: bool, trusted: VerifiedShards | None):
    """(the result, None) of a shard settled without opening it: not complete, missing, failing
    its format's file checks, or recorded and unchanged; else (None, its listing when re-read)."""
    fmt = manifest.shard_format
    name = entry["name"]
    path = root / name
    if entry.get("status") != "complete":
        return ([Problem(name, None, "not finished (the run that wrote it stopped early)")], None, None), None
    if not path.exists():
        return ([Problem(name, None, "listed complete but missing on disk")], None, None), None
    before_opening = fmt.file_problems(path, entry)
    if before_opening:
        return ([Problem(name, None, message) for message in before_opening], None, None), None
    listing = Listing(root, fmt, name) if reread else None
    # a record is trusted only for a shard whose reads the loader checks against digests (one written
    # before them could have its bytes changed behind an unchanged listing: it is re-read each time)
    if trusted is not None and UNIT_CHECKSUMS in entry \
            and trusted.matches(name, entry, array_specs(manifest, entry["trajectories"]), listing):
        return ([], "skipped", None), None
    return None, listing


def _opened(root: Path, manifest, entry: dict, reread: bool, listing: Listing | None):
    """The result of a shard opened: its arrays' shapes and dtypes, then its format's cheap
    checks of each array, or (``reread``) every array re-read against its checksum."""
    fmt = manifest.shard_format
    name = entry["name"]
    path = root / name
    specs = array_specs(manifest, entry["trajectories"])
    try:
        shard = open_shard(path, specs, fmt)
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds for broken metadata
        return [Problem(name, None, f"cannot open ({type(err).__name__}: {err})")], None, None
    found = []
    present = set(shard.array_keys())
    for array, (shape, dtype) in specs.items():
        if array not in present:
            found.append(Problem(name, array, "missing"))
            continue
        stored = shard[array]
        if tuple(stored.shape) != tuple(shape) or np.dtype(stored.dtype) != np.dtype(dtype):
            found.append(Problem(name, array, f"{stored.dtype} {stored.shape}, the manifest implies {dtype} {shape}"))
        elif not reread:  # a re-read checks the contents themselves
            found.extend(Problem(name, array, message) for message in fmt.array_problems(path, array, stored, entry))
    found.extend(derived_problems(manifest, entry, shard, read=reread))
    if not reread and not found:
        # a tar's members: each a regular file of ours (no link, device, ../ or absolute name)
        whole = fmt.whole_shard_problem(shard)
        if whole is not None:
            found.append(Problem(name, None, whole))
    if not reread or found:
        return found, None, None
    found = verify_contents(fmt, name, shard, entry) + derived_problems(manifest, entry, shard, read=True)
    unchanged = not found and listing.settled and Listing(root, fmt, name) == listing
    return found, "re-read", (entry, specs, listing) if unchanged else None


def expected_derived(header: dict, entry: dict, shard, names) -> dict[str, tuple[tuple, str, object]]:
    """Name -> (shape, dtype, values) of the derived arrays ``names`` of a shard (schema.DERIVED_ARRAYS):
    what the manifest implies for them. The values come as a callable (reading the stored prompt
    indices that the prompt text is derived from), so that a check of shapes alone reads nothing."""
    n, start, steps = entry["trajectories"], entry.get("first_trajectory", 0), header["sampler"]["num_steps"]
    indices = [key for key in ("prompt_index", "negative_prompt_index") if key in shard.array_keys()]

    def texts(name: str):
        return lambda: prompt_texts(header, {key: shard[key][:] for key in indices}).get(name)

    expected = {"trajectory": ((n,), "int64", lambda: np.arange(start, start + n, dtype=np.int64)),
                "step": ((steps,), "int64", lambda: np.arange(steps, dtype=np.int64))}
    if "prompt_index" in indices:  # a text store: each trajectory's prompt and negative prompt
        expected.update({key: ((n,), "str", texts(key)) for key in ("prompt", "negative_prompt")})
    return {key: expected.get(key) for key in names}


def derived_problems(header: dict, entry: dict, shard, read: bool) -> list[Problem]:
    """How the derived arrays a shard holds (older shards hold none) disagree with what the manifest
    implies: their shape and dtype, and with ``read`` every value, recomputed from the manifest (and
    the stored prompt indices). They are outside the checksums, so nothing else checks them."""
    name, found = entry["name"], []
    present = [key for key in DERIVED_ARRAYS if key in shard.array_keys()]
    for key, spec in expected_derived(header, entry, shard, present).items():
        if spec is None:
            found.append(Problem(name, key, "present, but the manifest implies none (not a text store)"))
            continue
        shape, dtype, values = spec
        stored = shard[key]
        kind = "str" if np.dtype(stored.dtype).kind in "OUT" or str(stored.dtype).startswith("<U") else None
        stored_dtype = kind or str(np.dtype(stored.dtype))
        if tuple(stored.shape) != shape or stored_dtype != dtype:
            found.append(Problem(name, key, f"{stored_dtype} {tuple(stored.shape)}, the manifest implies {dtype} "
                                 f"{shape}"))
            continue
        if not read:
            continue
        try:
            actual, wanted = list(np.asarray(stored[:]).tolist()), list(np.asarray(values()).tolist())
        except Exception as err:  # noqa: BLE001 - truncated chunks fail in the codec
            found.append(Problem(name, key, f"unreadable ({type(err).__name__}: {err})"))
            continue
        wrong = [i for i, (a, b) in enumerate(zip(actual, wanted)) if a != b]
        if wrong:
            first = wrong[0]
            found.append(Problem(name, key, f"{len(wrong)} of {len(wanted)} value(s) differ from what the manifest "
                                 f"implies (row {first}: {actual[first]!r}, expected {wanted[first]!r}); derived "
                                 "from the manifest, outside the checksums"))
    return found


def read_problem(fmt, entry: dict, key: str, array, start: int, stop: int, value: np.ndarray) -> str | None:
    """What is wrong with rows [start, stop) of array ``key`` of a shard, as just read (``value``;
    ``array`` the open array they came from), against the digests recorded when the shard was
    written: the unit's digest, or for an array read whole its checksum. None when they match, or
    when the entry records no digest for them (a shard written before read-time digests)."""
    if read_by_unit(key, array.shape, array.dtype):
        rows, digests = entry.get(UNIT_ROWS), (entry.get(UNIT_CHECKSUMS) or {}).get(key)
        if not rows or digests is None:
            return None
        unit, offset = divmod(start, rows)
        if offset or stop != min(entry["trajectories"], start + rows) or unit >= len(digests):
            return (f"trajectories {start}-{stop} are not a unit of {rows} recorded when the shard was written "
                    "(internal: the loader reads whole units)")
        if unit_checksum(value) == digests[unit]:
            return None
    elif (start, stop) != (0, entry["trajectories"]) or whole_checksum(value) == (entry.get("checksums") or {}).get(
            key, whole_checksum(value)):
        return None
    return (f"trajectories {start}-{stop} do not match the digest recorded when they were written "
            f"({fmt.rows_where(entry, array, start, stop)} changed on disk)")


def verify_contents(fmt, name: str, shard, entry: dict) -> list[Problem]:
    """Re-read every array of an open shard: name each one that is unreadable (truncated,
    corrupted), holds NaN or inf, or whose checksum differs from the manifest's."""
    whole = fmt.whole_shard_problem(shard)
    if whole is not None:
        return [Problem(name, None, whole)]
    found, sums = [], {}
    expected = entry.get("checksums") or {}
    recorded = entry.get(UNIT_CHECKSUMS) or {}  # the digests the loader checks (absent in older entries)
    rows = entry.get(UNIT_ROWS)
    if not isinstance(rows, int) or rows <= 0 or not isinstance(recorded, dict):
        recorded, rows = {}, 1  # validate_manifest refuses these; a shard's own record may still hold them
    units = list(row_slices(entry["trajectories"], rows))
    for array in sorted(set(shard.array_keys()) - set(DERIVED_ARRAYS)):  # derived arrays: no checksum
        per_unit = None
        try:
            if array in recorded:  # one pass: the checksum and the digest of every unit
                sums[array], per_unit, finite = unit_checksums(shard[array], units, check_finite=True)
            else:
                sums[array], finite = array_checksum(shard[array], check_finite=True)
        except Exception as err:  # noqa: BLE001 - truncated chunks fail in the codec
            found.append(Problem(name, array, f"unreadable ({type(err).__name__}: {err})"))
            continue
        if not finite:
            found.append(Problem(name, array, "holds NaN or inf"))
        if array in expected and sums[array] != expected[array]:
            found.append(Problem(name, array, "checksum differs from the manifest (data changed on disk)"))
        elif per_unit is not None and per_unit != recorded[array]:
            found.append(Problem(name, array, f"the manifest's {UNIT_CHECKSUMS} differ from the data (the manifest "
                                 "was edited or damaged)"))
    if not found and combined_checksum(sums) != entry.get("checksum"):
        found.append(Problem(name, None, "checksum differs from the manifest (data changed on disk)"))
    return found
