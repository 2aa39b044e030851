"""Inspect a trajectory store with dask: size, compression, w histogram, per-step statistics and
integrity. Exits non-zero when the store is not sound."""

import argparse
import json
import sys
from pathlib import Path

from agd_pipeline.cli import command_line, one_line_errors, run_command

SCHEDULERS = ("threads", "processes", "synchronous", "single-threaded", "sync", "distributed")
ADDRESSES = ("tcp://", "tls://", "inproc://")
MAX_BINS = 100_000
MAX_WORKERS = 256


def address_problem(address: str) -> str | None:
    """What is wrong with a dask.distributed scheduler address (or None); dask's own parsers raise
    ValueError deep inside the client for these."""
    protocol, _, location = address.partition("://")
    if protocol == "inproc":
        parts = location.split("/")
        if len(parts) != 3 or not all(parts) or not parts[1].isdigit():
            return "expected inproc://IP/PID/N"
        return None
    host, _, port = location.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected {protocol}://HOST:PORT"
    return None


def check_args(args) -> str | None:
    """What is wrong with the options, naming the option (or None)."""
    if not args.store.strip():
        return "store: give the trajectory store folder"
    if not 1 <= args.bins <= MAX_BINS:
        return f"--bins: must lie in [1, {MAX_BINS}] (got {args.bins})"
    scheduler = args.scheduler
    if scheduler is not None and scheduler not in SCHEDULERS:
        if not scheduler.startswith(ADDRESSES):
            return (f"--scheduler: unknown value {scheduler!r}; allowed: {', '.join(SCHEDULERS)}, or a scheduler "
                    "address (tcp://HOST:PORT, tls://HOST:PORT, inproc://IP/PID/N)")
        problem = address_problem(scheduler)
        if problem:
            return f"--scheduler: {scheduler!r} is not a scheduler address: {problem}"
    if not 1 <= args.workers <= MAX_WORKERS:
        return f"--workers: must lie in [1, {MAX_WORKERS}] (got {args.workers})"
    if args.json is not None:
        path = Path(args.json)
        if not args.json.strip() or path.is_dir():
            return f"--json: {args.json!r} is not a file name"
        if not path.parent.is_dir():
            return f"--json: the folder {str(path.parent)!r} does not exist"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=command_line("inspect"), description=__doc__)
    parser.add_argument("store", nargs="?", default="data/trajectories", help="store folder")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every shard: checksums against the manifest, truncation, NaN/inf (each "
                        "shard that passes is recorded, so train's default verify=changed need not re-read it)")
    parser.add_argument("--bins", type=int, default=10, help="bins of the w histogram")
    parser.add_argument("--scheduler", default=None,
                        help="dask scheduler for the statistics: threads (default), processes, synchronous "
                        "(also single-threaded, sync), distributed (a dask.distributed LocalCluster on this "
                        "machine), or the address of a running dask.distributed scheduler (tcp://host:8786, "
                        "tls://..., inproc://...)")
    parser.add_argument("--workers", type=int, default=2, help="with --scheduler distributed: worker processes")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    one_line_errors(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from agd_pipeline.inspection import format_summary, summarise
        from agd_pipeline.store import TrajectoryStore
        from agd_pipeline.store.schema import repair

        store = TrajectoryStore(args.store)
        # --verify re-reads every shard (whatever was verified before) and records those that pass
        problems = store.problems(mode="full" if args.verify else "cheap", log=print)
        if problems:
            print(f"{args.store}: {len(problems)} problem(s):")
            for p in problems:
                print(f"  {p}")
            print(repair())
            return 1
        summary = summarise(store, bins=args.bins, scheduler=args.scheduler, workers=args.workers)
        print(f"store: {args.store}  ({'verified: checksums match' if args.verify else 'cheap check passed'})")
        print(format_summary(summary))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        return 0 if all(summary["finite"].values()) else 1

    return run_command(body, lambda: check_args(args),
                       interrupted=f"re-run the same command to inspect {args.store} again")

if __name__ == "__main__":
    sys.exit(main())
