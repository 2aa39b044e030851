"""Inspect a trajectory store with dask: size, compression, w histogram, per-step statistics and
integrity. Exits non-zero when the store is not sound."""

import argparse
import json
import sys

from agd_pipeline.errors import AgdError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__)
    parser.add_argument("store", nargs="?", default="data/trajectories", help="store folder")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every shard: checksums against the manifest, truncation, NaN/inf")
    parser.add_argument("--bins", type=int, default=10, help="bins of the w histogram")
    parser.add_argument("--scheduler", default=None,
                        help="dask scheduler for the statistics: threads (default), processes, synchronous, "
                        "distributed (a dask.distributed LocalCluster on this machine), or the address of a "
                        "running dask.distributed scheduler (tcp://host:8786)")
    parser.add_argument("--workers", type=int, default=2, help="with --scheduler distributed: worker processes")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = parser.parse_args(argv)
    from agd_pipeline.inspection import format_summary, summarise
    from agd_pipeline.store import REPAIR, TrajectoryStore

    try:
        store = TrajectoryStore(args.store)
        problems = store.problems(full=args.verify)
        if problems:
            print(f"{args.store}: {len(problems)} problem(s):")
            for p in problems:
                print(f"  {p}")
            print(REPAIR)
            return 1
        summary = summarise(store, bins=args.bins, scheduler=args.scheduler, workers=args.workers)
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"store: {args.store}  ({'verified: checksums match' if args.verify else 'cheap check passed'})")
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if all(summary["finite"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
