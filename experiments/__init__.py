"""The paper's claims as DVC experiments of the repository's default pipelines (not part of the
installed library: it drives ``dvc`` in a clone of this repository).

- :mod:`experiments.catalog`: each experiment's question, variants (``-S`` overrides of a pipeline's
  params) and table columns (``EXPERIMENTS``);
- :mod:`experiments.driver`: runs the variants as DVC experiments, ``--jobs`` at a time, and reads
  their summary metrics back from ``dvc exp show --json``;
- :mod:`experiments.tables`: the tracked results (``docs/experiments/<name>/results.csv``, ``.md``,
  ``plot.png``) and the documentation block rendered from them.

``python -m stages.experiments`` is the command line over all three.
"""

from .catalog import EXPERIMENTS, EXPERIMENTS_DIR, Column, Experiment, Variant, get_experiment
from .driver import (SHOW_RETRIES, collect, overview, prepare_command, run, run_commands, run_in_group, show_json)
from .tables import markdown_table, read_results, readme_block, write_results

__all__ = ["EXPERIMENTS", "EXPERIMENTS_DIR", "SHOW_RETRIES", "Column", "Experiment", "Variant", "collect",
           "get_experiment", "markdown_table", "overview", "prepare_command", "read_results", "readme_block", "run",
           "run_commands", "run_in_group", "show_json", "write_results"]
