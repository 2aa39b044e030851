"""An experiment's results as files git tracks: ``docs/experiments/<name>/results.csv`` and
``results.md`` (each run's summary metrics), ``plot.png``, and the documentation block rendered from
them (``python -m stages.experiments report NAME``, or ``--from-results`` without DVC)."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

from agd_pipeline.errors import AgdError, os_reason, require

from .catalog import EXPERIMENTS_DIR, Column, Experiment

def _keys(experiment: Experiment) -> list[str]:
    """The summary keys an experiment's table and plot need, in table order (each column's bound
    after the columns)."""
    keys = [c.key for c in experiment.columns]
    keys += [key for key in (experiment.x, *experiment.plot) if key and key not in keys]
    return keys + [c.bound for c in experiment.columns if c.bound and c.bound not in keys]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _cell(row: dict, column: Column) -> str:
    """A table cell: the value, and after it the 95 % bound where the column has one and the run
    recorded it ("1.0 (<= 1.5)")."""
    text = _fmt(row[column.key], column.spec)
    bound = row.get(column.bound) if column.bound else None
    if bound is not None and row[column.key] is not None:
        text += f" ({'≤' if column.bound.endswith('_high') else '≥'} {_fmt(bound, column.spec)})"
    return text


def markdown_table(experiment: Experiment, rows: list[dict]) -> str:
    """The table of results.md and the README block; a column whose runs recorded its bound says so
    in its header."""
    bounded = {c.key for c in experiment.columns if c.bound and any(row.get(c.bound) is not None for row in rows)}
    header = f"| {experiment.row_header} | " + " | ".join(
        c.header + (" (95 % bound)" if c.key in bounded else "") for c in experiment.columns) + " |"
    lines = [header, "|" + "---|" * (len(experiment.columns) + 1)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row, c) for c in experiment.columns) + " |")
    return "\n".join(lines)


def write_results(experiment: Experiment, rows: list[dict], root: Path = EXPERIMENTS_DIR) -> Path:
    """results.csv, results.md and plot.png under ``root/<name>``; returns that folder."""
    folder = Path(root) / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["variant", "label", "run", *_keys(experiment)])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(markdown_table(experiment, rows) + "\n")
    plot(experiment, rows, folder / "plot.png")
    return folder


def read_results(experiment: Experiment, root: Path = EXPERIMENTS_DIR) -> list[dict]:
    """The rows :func:`write_results` wrote to ``root/<name>/results.csv``, values typed again (an
    empty cell is a missing metric), so the table, plot and README block can be rendered anew
    without the DVC experiments (a fresh clone has the tracked table, not the runs)."""
    path = Path(root) / experiment.name / "results.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            stored = list(csv.DictReader(f))
    except FileNotFoundError:
        raise AgdError(f"{path} does not exist; run `python -m stages.experiments run {experiment.name}` "
                       "first") from None
    except OSError as err:  # a folder in its place, no permission, ...
        raise AgdError(f"{path}: cannot read it ({os_reason(err)}); restore it with `git checkout -- {path}` or run "
                       "the experiment again") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise AgdError(f"{path} is not a readable CSV table ({e}); restore it with `git checkout -- {path}` "
                       "or run the experiment again") from None
    for line, row in enumerate(stored, start=2):
        # csv fills a short row's missing cells with None and keeps a long row's extra ones under None
        if None in row or None in row.values():
            raise AgdError(f"{path}, line {line}: {'cut short' if None in row.values() else 'too many cells'} "
                           f"(a truncated or damaged file?); restore it with `git checkout -- {path}` or run "
                           "the experiment again")
    names = [v.name for v in experiment.variants]
    if [row.get("variant") for row in stored] != names:
        raise AgdError(f"{path} holds the variants {[row.get('variant') for row in stored]}, not the "
                       f"experiment's {names}; run the experiment again")
    bounds = {c.bound for c in experiment.columns if c.bound}  # absent from a table written before them
    missing = [key for key in _keys(experiment) if key not in stored[0] and key not in bounds]
    if missing:
        raise AgdError(f"{path} has no column {', '.join(missing)}; run the experiment again")
    labels = {v.name: v.label for v in experiment.variants}
    return [{"variant": row["variant"], "label": labels[row["variant"]], "run": row["run"],
             **{key: _number(row.get(key, ""), path, key, line) for key in _keys(experiment)}}
            for line, row in enumerate(stored, start=2)]


# what write_results writes for a number: an int, or a float as repr gives it (no nan, inf, 1_0, 0x1, spaces)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _number(text: str, path: Path, key: str, line: int):
    """A cell of results.csv as the number write_results wrote (int or float), None for an empty cell;
    anything else (nan, inf, 1_0, ' 1', 1e999) is refused naming the file, line and column."""
    if text == "":
        return None
    if _INTEGER.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text) and math.isfinite(float(text)):
        return float(text)
    raise AgdError(f"{path}, line {line}: column {key} holds {text!r}, not a finite decimal number; restore it with "
                   f"`git checkout -- {path}` or run the experiment again")


def plot(experiment: Experiment, rows: list[dict], path: Path) -> None:
    matplotlib = require("matplotlib", f"the experiment's plot {path.name}")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    headers = {c.key: c.header for c in experiment.columns}
    panels = len(experiment.plot)
    if experiment.x:
        fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2))
    else:  # one horizontal bar per variant, its label once on the left
        fig, axes = plt.subplots(1, panels, figsize=(2.6 + 2.8 * panels, 1.3 + 0.32 * len(rows)), sharey=True)
    axes = np.atleast_1d(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, experiment.plot):
        values = [np.nan if row[key] is None else row[key] for row in rows]
        if experiment.x:
            _curves(ax, experiment, rows, values, colors)
        else:
            ax.barh(range(len(rows)), values, color=(colors * len(rows))[:len(rows)])
            for i, v in enumerate(values):
                if np.isfinite(v):
                    ax.annotate(f"{v:.3g}", (v, i), xytext=(2, 0), textcoords="offset points", va="center",
                                fontsize=7)
            ax.margins(x=0.25)
        ax.set_title(headers.get(key, key), fontsize=8)
    if not experiment.x:
        axes[0].set_yticks(range(len(rows)), [row["label"] for row in rows], fontsize=7)
        axes[0].invert_yaxis()
    fig.suptitle(experiment.title, fontsize=10)
    if experiment.x:  # the groups' legend below the panels, where it covers no point
        handles, labels = axes[0].get_legend_handles_labels()
        columns = min(4, len(labels)) or 1
        legend_rows = -(-len(labels) // columns)
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=columns, frameon=False)
        fig.set_figheight(fig.get_figheight() + 0.2 * legend_rows)
        fig.tight_layout(rect=(0, 0.2 * legend_rows / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(ax, experiment: Experiment, rows: list[dict], values: list[float], colors) -> None:
    """One panel of a curve plot: each variant group a line (or single points) against ``x``,
    every point named by its variant."""
    import numpy as np

    group_of = {v.name: v.group or v.name for v in experiment.variants}
    groups = list(dict.fromkeys(group_of[row["variant"]] for row in rows))
    for color, group in zip(colors * (1 + len(groups) // len(colors)), groups):
        points = sorted((row[experiment.x], value, row["variant"]) for row, value in zip(rows, values)
                        if group_of[row["variant"]] == group and row[experiment.x] is not None
                        and np.isfinite(value))
        if not points:
            continue
        xs, ys, names = zip(*points)
        ax.plot(xs, ys, "o-" if len(points) > 1 else "o", color=color, label=group, markersize=4)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel({c.key: c.header for c in experiment.columns}.get(experiment.x, experiment.x), fontsize=8)
    if experiment.log_x:
        ax.set_xscale("log")
    # the measured x values as the ticks (a log axis would otherwise print 2 x 10^1)
    ticks = sorted({row[experiment.x] for row in rows if row[experiment.x] is not None})
    if 0 < len(ticks) <= 8 and all(b > 1.3 * a for a, b in zip(ticks, ticks[1:])):
        ax.minorticks_off()
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=7, rotation=30 if len(ticks) > 4 else 0)
    elif experiment.log_x:
        require("matplotlib", "the experiment's plot")  # loaded by plot() already; says so here too
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7)


def readme_block(experiment: Experiment, folder: Path, link_root: Path | None = None) -> str:
    """The text between the experiment's markers (in README.md or a docs page): command, table and
    plot. The plot's link is relative to link_root, the folder of the file holding the block (by
    default the paths stay as ``folder`` gives them)."""
    table = (folder / "results.md").read_text().strip()
    plot = (folder / "plot.png").as_posix() if link_root is None else \
        os.path.relpath((folder / "plot.png").resolve(), Path(link_root).resolve()).replace(os.sep, "/")
    return "\n".join([
        f"<!-- results:experiment-{experiment.name}:start -->",
        f"<!-- written by `python -m stages.experiments report {experiment.name}` from "
        f"{folder.as_posix()}/results.csv; edit the renderer, not this block -->",
        "",
        f"Run: `python -m stages.experiments run {experiment.name}` (then `report`). {experiment.question}",
        "",
        table,
        "",
        f"![{experiment.title}]({plot})",
        f"<!-- results:experiment-{experiment.name}:end -->",
    ])
