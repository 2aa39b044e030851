"""Convert a trajectory store to another format: Zarr <-> WebDataset tar shards (same shards,
same checksums), optionally recompressed or made lossy with BitRound. Resumable: re-run the same
command to finish an interrupted conversion."""

import argparse
import sys

from agd_pipeline.errors import AgdError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.convert", description=__doc__)
    parser.add_argument("source", help="a complete store (written by stages.generate)")
    parser.add_argument("target", help="folder for the converted store")
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "zarr"], help="target format")
    parser.add_argument("--compressor", default=None, choices=["blosc-zstd", "zstd", "none"],
                        help="target codec (default: the source's)")
    parser.add_argument("--bitround-keepbits", type=int, default=None,
                        help="lossy: keep this many float16 mantissa bits (default: the source's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    from agd_pipeline.store import convert_store

    try:
        convert_store(args.source, args.target, args.format, args.compressor, args.bitround_keepbits,
                      progress=not args.no_progress)
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
