"""Convert a trajectory store to another format: Zarr <-> WebDataset tar shards (same shards,
same checksums), optionally recompressed or made lossy with BitRound. Resumable: re-run the same
command to finish an interrupted conversion."""

import argparse
import sys
from pathlib import Path

from agd_pipeline.cli import command_line, one_line_errors, run_command
from agd_pipeline.store.formats import CODECS, FORMATS


def check_args(args) -> str | None:
    """What is wrong with the arguments, naming the argument (or None)."""
    if not args.source.strip():
        return "source: give the store folder to convert"
    if not args.target.strip():
        return "target: give a folder for the converted store"
    if args.bitround_keepbits is not None and not 0 <= args.bitround_keepbits <= 10:
        return (f"--bitround-keepbits: must lie in [0, 10] (float16 has 10 mantissa bits; 0 = lossless), "
                f"got {args.bitround_keepbits}")
    source, target = Path(args.source), Path(args.target)
    if not source.is_dir():
        return f"source: {args.source!r} is not a folder (a store written by `{command_line('generate')}`)"
    source, resolved = source.resolve(), target.resolve()
    if resolved == source:
        return f"target: {args.target!r} is the source itself; give another folder"
    if source in resolved.parents:
        return f"target: {args.target!r} lies inside the source {args.source!r}; give a folder outside it"
    if resolved in source.parents:
        return f"target: {args.target!r} contains the source {args.source!r}; give a folder outside it"
    for folder in (target, *target.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                return f"target: {str(folder)!r} exists and is not a folder"
            break
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=command_line("convert"), description=__doc__)
    parser.add_argument("source", help="a complete store (written by stages.generate)")
    parser.add_argument("target", help="folder for the converted store")
    parser.add_argument("--format", default="webdataset", choices=list(FORMATS), help="target format")
    parser.add_argument("--compressor", default=None, choices=["auto", *CODECS],
                        help="target codec (default: the source's where the target format has it, else auto: "
                        "blosc-zstd for zarr, none for webdataset, whose .npz members allow deflate or none)")
    parser.add_argument("--bitround-keepbits", type=int, default=None,
                        help="lossy: keep this many float16 mantissa bits (default: the source's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    one_line_errors(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        from agd_pipeline.store import convert_store

        convert_store(args.source, args.target, args.format, args.compressor, args.bitround_keepbits,
                      progress=not args.no_progress)

    return run_command(body, lambda: check_args(args),
                       interrupted=f"re-run the same command to finish converting {args.source} (it resumes)")

if __name__ == "__main__":
    sys.exit(main())
