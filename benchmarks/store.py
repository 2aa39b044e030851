"""Benchmarks of the store at scale: stage two's verification of an unchanged store (the record of
shards verified in full), and the cost of one commit in stage one (the manifest's journal).
Numbers are printed and written to a file; nothing here is a test."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from agd_pipeline.store import MANIFEST, StoreWriter, TrajectoryStore, read_manifest
from agd_pipeline.store.files import write_json_atomic
from agd_pipeline.store.verified_cache import CACHE_ENV
from benchmarks.data_path import synthetic_arrays, synthetic_header, write_synthetic_store

SUMMARY = re.compile(r"store: (\d+) shard\(s\) verified earlier and unchanged, (\d+) re-read")


@contextlib.contextmanager
def _cache_folder(folder: Path):
    """The verification cache in ``folder`` for the duration (never the user's own)."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


def _timed_check(store: TrajectoryStore, mode: str) -> dict:
    lines = []
    began = time.perf_counter()
    store.check(mode=mode, log=lines.append)
    seconds = time.perf_counter() - began
    match = next((SUMMARY.match(line) for line in lines if SUMMARY.match(line)), None)
    skipped, re_read = (int(match.group(1)), int(match.group(2))) if match else (0, len(store.shards))
    return {"seconds": seconds, "shards_skipped": skipped, "shards_re_read": re_read if mode != "cheap" else 0}


def verify_cache_table(shards: int = 2000, steps: int = 4, latent_shape=(1, 8, 8), fmt: str = "zarr",
                       workdir: str | None = None) -> list[dict]:
    """A synthetic store of ``shards`` shards of one trajectory each, checked as train checks it
    (``train.verify changed``): the first start re-reads every shard, the second finds them all
    recorded and unchanged. Also the cheap check's time on the same store, for comparison."""
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp) / "store"
        began = time.perf_counter()
        write_synthetic_store(root, synthetic_header(latent_shape, shards, steps, 1, fmt=fmt))
        written = time.perf_counter() - began
        time.sleep(0.1)  # files modified within the last 50 ms are not recorded (verified_cache.RACY_NS)
        files = sum(1 for p in root.rglob("*") if p.is_file())
        with _cache_folder(Path(tmp) / "cache"):
            for check, mode in (("first (full re-read)", "changed"), ("second (unchanged)", "changed"),
                                ("cheap checks, for comparison", "cheap")):
                store = TrajectoryStore(root)  # as a new train start does: the manifest read again
                rows.append({"check": check, "mode": mode, "format": fmt, "shards": shards, "files": files,
                             "latent": "x".join(map(str, latent_shape)), "steps": steps,
                             "seconds_to_write_store": written, **_timed_check(store, mode)})
    return rows


def manifest_commit_table(shards=(40_000,), commits: int = 10, workdir: str | None = None) -> list[dict]:
    """One commit (a shard's entry recorded in the manifest) in a store of ``shards`` shards: the
    append to the journal now (median of ``commits``), against rewriting the whole manifest (what
    a commit cost before, timed on a manifest of as many complete entries), and reading the
    manifest with its journal."""
    rows = []
    for total in shards:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            root = Path(tmp) / "store"
            writer = StoreWriter(root, synthetic_header((1, 8, 8), total, 4, 1), log=lambda *a, **k: None)
            shard = writer.begin_shard(0)  # one real shard: an entry of the real size
            shard.write(0, synthetic_arrays((1, 8, 8), 0, 1, 4))
            entry = shard.finish()

            def entry_of(index: int, entry=entry, fmt=writer.shard_format) -> dict:
                return {**copy.deepcopy(entry), "name": fmt.shard_name(index), "first_trajectory": index}

            appends = []
            for index in range(1, min(total, commits + 1)):
                one = entry_of(index)
                began = time.perf_counter()
                writer.mark_complete(index, one)
                appends.append(time.perf_counter() - began)
            began = time.perf_counter()
            read_manifest(root)
            read_seconds = time.perf_counter() - began

            complete = {**writer.manifest, "shards": [entry_of(i) for i in range(total)]}
            rewrites = []
            for _ in range(3):
                began = time.perf_counter()
                write_json_atomic(Path(tmp) / "whole.json", complete)
                rewrites.append(time.perf_counter() - began)
            rows.append({"shards": total, "commits_timed": len(appends),
                         "append_seconds": statistics.median(appends), "append_max_seconds": max(appends),
                         "rewrite_seconds": statistics.median(rewrites),
                         "manifest_bytes_complete": (Path(tmp) / "whole.json").stat().st_size,
                         "manifest_bytes_snapshot": (root / MANIFEST).stat().st_size,
                         "read_manifest_seconds": read_seconds, "journal_lines": len(appends) + 1})
    return rows
