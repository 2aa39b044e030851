"""Copying a complete store into another format (or codec, or BitRound precision), shard for shard."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StoreError
from ..locks import FolderLock
from .formats import codec_available, get_format, resolve_compressor
from .ownership import refuse_foreign_folder
from .reader import TrajectoryStore
from .schema import DERIVED_ARRAYS, repair
from .writer import StoreWriter


def convert_store(source: str | os.PathLike, target: str | os.PathLike, fmt: str = "webdataset",
                  compressor: str | None = None, bitround_keepbits: int | None = None,
                  progress: bool = True, log=print) -> dict:
    """Copy a complete store into another format (or compressor), shard for shard. The target is
    written like stage one writes (partial shards verified, then renamed into place; resumable).
    Every source shard is re-read against its checksums before it is copied, and a lossless copy
    is published only once its checksums equal the source's."""
    from tqdm.auto import tqdm

    get_format(fmt)  # an unknown format is refused before anything is read or written
    if bitround_keepbits is not None and not 0 <= bitround_keepbits <= 10:
        raise StoreError(f"bitround_keepbits must lie in [0, 10] (float16 has 10 mantissa bits; 0 = lossless), "
                         f"got {bitround_keepbits}")
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise StoreError(f"the target {target} must not be the source {source} or lie inside it")
    refuse_foreign_folder(target)
    with FolderLock(source, "convert (reading)", shared=True, create=False), FolderLock(target, "convert"):
        src = TrajectoryStore(source)
        src.check(full=False)

        # ---- the target's settings: the source's, in the new format (and codec, precision)
        header = src.manifest.run_header()
        header.update(format=fmt)
        keep = src.manifest.compressor if codec_available(src.manifest.compressor, fmt) else "auto"
        header["compressor"] = resolve_compressor(compressor if compressor is not None else keep, fmt)
        if bitround_keepbits is not None:
            header["bitround_keepbits"] = bitround_keepbits
        lossless = header.get("bitround_keepbits", 0) == src.manifest.bitround_keepbits
        writer = StoreWriter(target, header, log=log)

        # ---- shard for shard: verified source, copied by read units, verified copy
        pending = writer.pending()
        with writer.compacting():  # the target's manifest as one plain JSON file at the end
            for index in tqdm(pending, desc=f"convert to {fmt}", unit="shard", disable=not progress):
                entry = src.shards[index]
                damaged = src.problems(full=True, only={entry["name"]})
                if damaged:
                    listing = "; ".join(map(str, damaged[:3]))
                    raise StoreError(f"source shard {source / entry['name']} is damaged ({listing}); "
                                     f"nothing of it was converted. Repair the source first. {repair()}")
                group = src.open_shard(entry["name"])
                with writer.begin_shard(index) as shard:  # an error removes its partial files
                    for rows in src.shard_format.read_units(src.manifest, entry):
                        try:
                            arrays = {name: group[name][rows] for name in group.array_keys()
                                      if name not in DERIVED_ARRAYS}  # the target derives its own
                        except Exception as err:  # noqa: BLE001 - a chunk damaged since the check
                            raise StoreError(f"{source / entry['name']}: cannot read trajectories {rows.start}-"
                                             f"{rows.stop} ({type(err).__name__}: {err}). {repair()}") from None
                        shard.write(rows.start, arrays)
                    shard.finish(expected_checksums=entry.get("checksums") if lossless else None)
        log(f"{target}: {len(pending)} shard(s) converted to {fmt}" + ("" if pending else " (already complete)"))
        return {"converted_shards": len(pending), "shards": writer.num_shards}
