"""The paper's claims as reproducible DVC experiments.

  python -m stages.experiments list                 the experiments and what each asks
  python -m stages.experiments run NAME             `dvc repro` of the stages the variants share (workspace),
                                                    then every variant as a DVC experiment (`dvc exp run
                                                    --queue -S ...`, --jobs at a time), then `report`
  python -m stages.experiments report NAME          the table and plot from `dvc exp show --json`:
                                                    docs/experiments/NAME/results.{csv,md}, plot.png, the results block
                                                    (in README.md or the docs page holding its markers)
  python -m stages.experiments report NAME --from-results
                                                    the same from the tracked results.csv (no DVC runs needed)
  python -m stages.experiments commands NAME        print the dvc commands `run` would run
  python -m stages.experiments show NAME            the experiment's runs as a table that fits the terminal:
                                                    each variant's state (queued, running, finished, failed)
                                                    and its results (plain `dvc exp show` lists every param,
                                                    metric and dependency of every pipeline: about 900 columns)

Each variant is one DVC experiment of the default pipeline (dvc.yaml, or the text defaults'
pipelines/text/dvc.yaml): `dvc exp show` lists them with their params and summary metrics
(summary.json). They run in DVC's copies of the repository (commit your changes first: DVC copies
what git and DVC track), sharing the DVC cache, as many at a time as --jobs says (DVC's queue; with
--jobs 1 one after the other, `dvc exp run --temp`). The first command runs the stages no variant
changes (the base model, say) in the workspace, so they run once, in a fresh clone too.
Interrupted with Ctrl-C, stopped with SIGTERM (`kill`) or SIGHUP (the terminal closed), every command
stops the dvc command it runs with everything that command started, and `run` the queue's runs of the
experiment as well; exit status 130, 143 or 129."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from agd_pipeline.interrupts import interruptible
from agd_pipeline.errors import AgdError
from experiments import (EXPERIMENTS, SHOW_RETRIES, collect, get_experiment, overview, prepare_command,
                                      read_results, readme_block, run, run_commands, show_json, write_results)


def default_jobs() -> int:
    """One variant per core this process may use: each stage runs one torch thread."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def report(name: str, readme: Path | None, log=print, from_results: bool = False) -> int:
    """Rewrite the experiment's table, plot and block; the block in ``readme``, or else in the one
    markdown file (README.md or docs/**/*.md) that holds its markers."""
    from stages.report import ReportError, block_file, replace_block

    experiment = get_experiment(name)
    rows = read_results(experiment) if from_results else collect(
        experiment, show_json(names=[experiment.run_name(v) for v in experiment.variants], tries=SHOW_RETRIES))
    folder = write_results(experiment, rows)
    log((folder / "results.md").read_text().rstrip())
    log(f"{folder}: results.csv, results.md, plot.png")
    try:
        readme = readme or block_file(f"<!-- results:experiment-{name}:start -->")
        text = readme.read_text()
        updated = replace_block(text, readme_block(experiment, folder, readme.resolve().parent), str(readme),
                                f"experiment-{name}")
    except (OSError, ReportError) as err:
        log(f"block experiment-{name} not updated: {err}")
        return 0
    if updated != text:
        readme.write_text(updated)
        log(f"{readme}: block experiment-{name} rewritten")
    return 0


def show(experiment, shown=None, console=None) -> int:
    """Print the experiment's runs (:func:`experiments.driver.overview`) as a table wrapped to the
    terminal's width; DVC's own ``dvc exp show`` has no setting that limits its columns."""
    from rich.console import Console
    from rich.table import Table

    if shown is None:
        shown = show_json(names=[experiment.run_name(v) for v in experiment.variants], tries=SHOW_RETRIES)
    table = Table(title=experiment.title, show_lines=False)
    for header in (experiment.row_header, "state", *(c.header for c in experiment.columns)):
        table.add_column(header, overflow="fold")
    for row in overview(experiment, shown):
        table.add_row(row["label"], row["state"], *row["cells"])
    (console or Console()).print(table)
    return 0


def main(argv=None) -> int:
    """Ctrl-C, SIGTERM or SIGHUP: the running dvc command's process group is stopped (and the queue's
    runs of `run`), one line says so, exit status 130, 143 or 129 (agd_pipeline.cli.interruptible)."""
    args = parser().parse_args(argv)
    return interruptible(lambda: _main(args), _advice(args))


def _advice(args) -> str:
    if args.action == "run":
        return (f"the runs of {args.name} were stopped; `python -m stages.experiments run {args.name}` starts them "
                "again (finished ones are replaced)")
    return f"re-run `python -m stages.experiments {args.action}{' ' + args.name if args.name else ''}`"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("list", "run", "report", "commands", "show"))
    parser.add_argument("name", nargs="?", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--readme", default=None, help="markdown file holding the experiment's results block "
                        "(default: the one of README.md and docs/**/*.md that holds it)")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="run: variants run at a time, each in DVC's queue (one torch thread per stage, so one "
                             "per core); 1 runs them one after the other with `dvc exp run --temp` "
                             "(default: the cores this process may use, %(default)s here)")
    parser.add_argument("--from-results", action="store_true",
                        help="report: read the rows from docs/experiments/NAME/results.csv instead of "
                             "`dvc exp show` (re-renders the table, plot and README block after a change to "
                             "the renderer, or in a clone without the runs)")
    return parser


def _main(args) -> int:
    try:
        if args.action == "list":
            for experiment in EXPERIMENTS.values():
                variants = ", ".join(v.name for v in experiment.variants)
                print(f"{experiment.name}: {experiment.question}\n  variants: {variants}")
            return 0
        if not args.name:
            parser().error(f"{args.action} needs an experiment name: {', '.join(EXPERIMENTS)}")
        if args.from_results and args.action != "report":
            parser().error("--from-results goes with report only")
        experiment = get_experiment(args.name)
        if args.jobs < 1:
            parser().error(f"--jobs must be at least 1 (got {args.jobs})")
        jobs = min(args.jobs, len(experiment.runs()))
        if args.action == "commands":
            for command in filter(None, [prepare_command(experiment), *run_commands(experiment, queue=jobs > 1)]):
                print(shlex.join(command))  # pasteable into a shell
            if jobs > 1:
                print(f"dvc queue start --jobs {jobs}")
            return 0
        if args.action == "show":
            return show(experiment)
        if args.action == "run":
            run(experiment, jobs=jobs, log=lambda message: print(message, flush=True))
        return report(args.name, Path(args.readme) if args.readme else None, from_results=args.from_results)
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
