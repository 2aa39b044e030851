"""The paper's claims as reproducible DVC experiments.

  python -m stages.experiments list                 the experiments and what each asks
  python -m stages.experiments run NAME             `dvc repro` of the default (workspace), then every
                                                    variant as `dvc exp run --temp -S ...`, then `report`
  python -m stages.experiments report NAME          the table and plot from `dvc exp show --json`:
                                                    docs/experiments/NAME/results.{csv,md}, plot.png, README block
  python -m stages.experiments report NAME --from-results
                                                    the same from the tracked results.csv (no DVC runs needed)
  python -m stages.experiments commands NAME        print the dvc commands `run` would run

Each variant is one DVC experiment of the default pipeline (dvc.yaml): `dvc exp show` lists them with
their params and summary metrics (data/eval/summary.json). They run in DVC's temporary copies of the
repository (commit your changes first: DVC copies what git and DVC track), sharing the DVC cache. The
first command brings the default pipeline up to date in the workspace (as `make repro` does), so the
base model is trained at most once, in a fresh clone too."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agd_pipeline.errors import AgdError
from agd_pipeline.experiments import (EXPERIMENTS, collect, get_experiment, prepare_command, read_results,
                                      readme_block, run, run_commands, show_json, write_results)


def report(name: str, readme: Path, log=print, from_results: bool = False) -> int:
    from stages.report import ReportError, replace_block

    experiment = get_experiment(name)
    rows = read_results(experiment) if from_results else collect(experiment, show_json())
    folder = write_results(experiment, rows)
    log((folder / "results.md").read_text().rstrip())
    log(f"{folder}: results.csv, results.md, plot.png")
    try:
        text = readme.read_text()
        updated = replace_block(text, readme_block(experiment, folder), str(readme), f"experiment-{name}")
    except (OSError, ReportError) as err:
        log(f"README not updated: {err}")
        return 0
    if updated != text:
        readme.write_text(updated)
        log(f"{readme}: block experiment-{name} rewritten")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("list", "run", "report", "commands"))
    parser.add_argument("name", nargs="?", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--readme", default="README.md", help="README holding the experiment's results block")
    parser.add_argument("--from-results", action="store_true",
                        help="report: read the rows from docs/experiments/NAME/results.csv instead of "
                             "`dvc exp show` (re-renders the table, plot and README block after a change to "
                             "the renderer, or in a clone without the runs)")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            for experiment in EXPERIMENTS.values():
                variants = ", ".join(v.name for v in experiment.variants)
                print(f"{experiment.name}: {experiment.question}\n  variants: {variants}")
            return 0
        if not args.name:
            parser.error(f"{args.action} needs an experiment name: {', '.join(EXPERIMENTS)}")
        experiment = get_experiment(args.name)
        if args.action == "commands":
            for command in [prepare_command(experiment), *run_commands(experiment)]:
                print(" ".join(command))
            return 0
        if args.action == "run":
            run(experiment)
        if args.from_results and args.action != "report":
            parser.error("--from-results goes with report only")
        return report(args.name, Path(args.readme), from_results=args.from_results)
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
