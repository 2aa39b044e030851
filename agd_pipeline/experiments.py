"""The paper's claims as DVC experiments: each experiment is a few variants of the default pipeline
(``dvc.yaml``), each variant one ``dvc exp run --temp`` with ``--set-param`` overrides, so every run
is a DVC experiment with its params and metrics (``dvc exp show``). The runs execute in DVC's
temporary copies of the repository (the workspace is left as it is) and share its cache, so stages
whose inputs a variant does not change (the base model) are never run again.

After the runs, the experiment's table (each variant's summary metrics from ``dvc exp show --json``)
is written to ``docs/experiments/<name>/results.csv`` and ``results.md`` and its plot to
``docs/experiments/<name>/plot.png``, all tracked by git; README's block ``experiment-<name>`` is rendered
from them (``python -m stages.experiments report NAME``).
"""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AgdError, ConfigError

EXPERIMENTS_DIR = Path("docs/experiments")
SUMMARY_FILE = "summary.json"  # evaluate's DVC metrics file (agd_pipeline.evaluation.SUMMARY)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str  # what the table and plot call it
    params: dict = field(default_factory=dict)  # dotted params.yaml key -> value (dvc exp run -S)


@dataclass(frozen=True)
class Column:
    key: str  # a key of summary.json
    header: str
    spec: str = ".3f"


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    question: str
    variants: tuple[Variant, ...]
    columns: tuple[Column, ...]
    plot: tuple[str, ...]  # summary keys drawn as grouped bars, one group per key
    row_header: str = "data"  # what the table's first column names

    def run_name(self, variant: Variant) -> str:
        return f"{self.name}-{variant.name}"


SUMMARY_COLUMNS = (
    Column("gap_closed", "gap closed"),
    Column("mean_accuracy_agd", "acc AGD"),
    Column("mean_accuracy_cfg", "acc CFG"),
    Column("max_accuracy_drop_points", "max acc drop (points)", ".1f"),
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("mean_fid_cfg", "FID CFG", ".2f"),
    Column("max_fidelity_ratio", "FID(AGD,CFG) / FID(unguided,CFG)", ".3f"),
    Column("mean_rmse_to_cfg_agd", "RMSE AGD-CFG", ".3f"),
)

EXPERIMENTS = {
    "trajectories-vs-forward-noised": Experiment(
        name="trajectories-vs-forward-noised",
        title="Trajectories vs forward-noised data",
        question=("The paper's central ablation: the same adapters trained on the same number of (x, t, w) "
                  "pairs, drawn from the teacher's CFG sampling trajectories (AGD) or by noising real digits "
                  "with the forward process (standard guidance distillation), both labelled with CFG's output."),
        variants=(
            Variant("trajectories", "CFG trajectories (AGD)", {"generate.source": "trajectories",
                                                               "generate.real_data": ""}),
            Variant("forward-noised", "forward-noised real data", {"generate.source": "forward_noised",
                                                                   "generate.real_data": "data/base/train.npz"}),
        ),
        columns=SUMMARY_COLUMNS,
        plot=("gap_closed", "mean_fid_agd", "max_fidelity_ratio"),
    ),
    "unseen-w": Experiment(
        name="unseen-w",
        title="Guidance scales outside the training range",
        question=("How far adapters trained on one range of w follow CFG beyond it: trained on U[1, 3] and "
                  "evaluated up to w = 8, and trained on U[1, 6] (the default) and evaluated up to w = 10."),
        variants=(
            Variant("train-1-3", "U[1, 3] (unseen: 4, 6, 8)",
                    {"generate.guidance_max": 3.0, "evaluate.guidance_scales": [2.0, 3.0, 4.0, 6.0, 8.0]}),
            Variant("train-1-6", "U[1, 6] (unseen: 8, 10)",
                    {"generate.guidance_max": 6.0, "evaluate.guidance_scales": [2.0, 4.0, 6.0, 8.0, 10.0]}),
        ),
        columns=(
            Column("max_fidelity_ratio", "in range: FID(AGD,CFG) / FID(unguided,CFG)"),
            Column("outside_max_fidelity_ratio", "unseen w: FID(AGD,CFG) / FID(unguided,CFG)"),
            Column("max_accuracy_drop_points", "in range: max acc drop (points)", ".1f"),
            Column("outside_max_accuracy_drop_points", "unseen w: max acc drop (points)", ".1f"),
            Column("gap_closed", "gap closed (in range)"),
        ),
        plot=("max_fidelity_ratio", "outside_max_fidelity_ratio", "outside_max_accuracy_drop_points"),
        row_header="adapters trained on",
    ),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def _param_value(value) -> str:
    """A -S value DVC parses back to the same YAML value (strings quoted, lists as YAML)."""
    return json.dumps(value)


def run_commands(experiment: Experiment) -> list[list[str]]:
    """The ``dvc exp run`` command of each variant, in order."""
    commands = []
    for variant in experiment.variants:
        sets = [arg for key, value in variant.params.items() for arg in ("-S", f"{key}={_param_value(value)}")]
        commands.append(["dvc", "exp", "run", "--temp", "-n", experiment.run_name(variant), *sets, "dvc.yaml"])
    return commands


def run(experiment: Experiment, log=print, runner=subprocess.run) -> None:
    """Run every variant as a DVC experiment (replacing earlier runs of the same name)."""
    names = [experiment.run_name(v) for v in experiment.variants]
    existing = set(_experiment_rows(show_json(runner)))
    stale = [name for name in names if name in existing]
    if stale:
        log(f"replacing earlier runs: {', '.join(stale)}")
        _check(runner(["dvc", "exp", "remove", *stale], capture_output=True, text=True), "dvc exp remove")
    for command in run_commands(experiment):
        log("$ " + " ".join(command))
        result = runner(command, text=True)
        if result.returncode != 0:
            raise AgdError(f"{' '.join(command)} failed (exit {result.returncode}); its output is above. "
                           "Fix the cause and run the same command again: finished variants are replaced.")


def show_json(runner=subprocess.run) -> list:
    result = _check(runner(["dvc", "exp", "show", "--json"], capture_output=True, text=True), "dvc exp show")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise AgdError(f"dvc exp show --json printed something that is not JSON ({err})") from None


def _check(result, what: str):
    if result.returncode != 0:
        raise AgdError(f"{what} failed (exit {result.returncode}): {(result.stderr or '').strip()[-2000:]}")
    return result


def _experiment_rows(shown) -> dict[str, dict]:
    """{experiment name: its "data" (params, metrics)} for every named experiment in ``dvc exp show --json``."""
    found = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            name, data = node.get("name"), node.get("data")
            if isinstance(name, str) and isinstance(data, dict) and node.get("rev") != "workspace":
                found.setdefault(name, data)
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(shown)
    return found


def _summary(data: dict) -> dict | None:
    for path, entry in (data.get("metrics") or {}).items():
        if Path(path).name == SUMMARY_FILE and Path(path).parent.parent.as_posix() == "data":
            return (entry or {}).get("data")
    return None


def collect(experiment: Experiment, shown) -> list[dict]:
    """One row per variant: its run name, label and summary metrics. Refuses a missing run."""
    rows_by_name = _experiment_rows(shown)
    rows = []
    for variant in experiment.variants:
        name = experiment.run_name(variant)
        data = rows_by_name.get(name)
        summary = _summary(data) if data else None
        if not summary:
            raise AgdError(f"no finished DVC experiment {name!r} with data/eval/{SUMMARY_FILE}; run "
                           f"`python -m stages.experiments run {experiment.name}` first")
        rows.append({"variant": variant.name, "label": variant.label, "run": name,
                     **{c.key: summary.get(c.key) for c in experiment.columns}})
    return rows


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(experiment: Experiment, rows: list[dict]) -> str:
    header = f"| {experiment.row_header} | " + " | ".join(c.header for c in experiment.columns) + " |"
    lines = [header, "|" + "---|" * (len(experiment.columns) + 1)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(row[c.key], c.spec) for c in experiment.columns) + " |")
    return "\n".join(lines)


def write_results(experiment: Experiment, rows: list[dict], root: Path = EXPERIMENTS_DIR) -> Path:
    """results.csv, results.md and plot.png under ``root/<name>``; returns that folder."""
    folder = Path(root) / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["variant", "label", "run", *(c.key for c in experiment.columns)])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(markdown_table(experiment, rows) + "\n")
    plot(experiment, rows, folder / "plot.png")
    return folder


def plot(experiment: Experiment, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    headers = {c.key: c.header for c in experiment.columns}
    fig, axes = plt.subplots(1, len(experiment.plot), figsize=(3.6 * len(experiment.plot), 3.2))
    axes = np.atleast_1d(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, experiment.plot):
        values = [np.nan if row[key] is None else row[key] for row in rows]
        ax.bar(range(len(rows)), values, color=colors[:len(rows)])
        ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=15, ha="right", fontsize=8)
        ax.set_title(headers[key], fontsize=9)
        for i, v in enumerate(values):
            if np.isfinite(v):
                ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(experiment.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_block(experiment: Experiment, folder: Path) -> str:
    """The README text between the experiment's markers: command, table and plot."""
    table = (folder / "results.md").read_text().strip()
    return "\n".join([
        f"<!-- results:experiment-{experiment.name}:start -->",
        f"<!-- written by `python -m stages.experiments report {experiment.name}` from "
        f"{folder.as_posix()}/results.csv; edit the renderer, not this block -->",
        "",
        f"Run: `python -m stages.experiments run {experiment.name}` (then `report`). {experiment.question}",
        "",
        table,
        "",
        f"![{experiment.title}]({folder.as_posix()}/plot.png)",
        f"<!-- results:experiment-{experiment.name}:end -->",
    ])
