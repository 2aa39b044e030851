"""The results table of the evaluate stage, as Markdown: printed by ``stages.evaluate`` and written
into the README by ``stages.report`` (so both show the same numbers the same way). No heavy imports:
the report command reads JSON only."""

from __future__ import annotations


def results_table(rows: list[dict]) -> str:
    """One row per guidance scale of ``metrics.json``'s ``per_w``; ``*`` marks a w outside the
    training range, ``-`` a number that was not measured (no classifier)."""
    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| w | FID unguided | FID CFG | FID AGD | acc CFG | acc AGD | FID AGD-CFG | FID unguided-CFG "
             "| RMSE AGD-CFG | img/s CFG | img/s AGD | speed AGD/CFG |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["in_training_range"] else " *"
        lines.append(
            f"| {r['w']:g}{mark} | {cell(r['fid_unguided'], '.2f')} | {cell(r['fid_cfg'], '.2f')} | "
            f"{cell(r['fid_agd'], '.2f')} | {cell(r['accuracy_cfg'], '.3f')} | {cell(r['accuracy_agd'], '.3f')} | "
            f"{cell(r['fid_to_cfg_agd'], '.2f')} | {cell(r['fid_to_cfg_unguided'], '.2f')} | "
            f"{r['rmse_to_cfg_agd']:.3f} | {r['images_per_second_cfg']:.0f} | {r['images_per_second_agd']:.0f} | "
            f"{r['speed_ratio_agd_over_cfg']:.2f}x |")
    return "\n".join(lines)


def _ci(estimate: dict | None, spec: str, scale: float = 1.0) -> str:
    """'point [low, high]' of an evidence estimate; '-' where it is undefined."""
    if not estimate or estimate.get("point") is None:
        return "-"
    return (f"{scale * estimate['point']:{spec}} [{scale * estimate['low']:{spec}}, "
            f"{scale * estimate['high']:{spec}}]")


def evidence_table(rows: list[dict], per_w: dict) -> str:
    """The results table with 95 % intervals: one row per w of ``metrics.json``'s ``per_w``, the
    intervals from its ``evidence.per_w`` (``*``: outside the training range)."""
    lines = ["| w | acc unguided | acc CFG | acc AGD | drop AGD vs CFG (points) | McNemar p | guidance recovered "
             "| FID CFG | FID AGD | FID AGD / CFG | FID(AGD,CFG) / FID(unguided,CFG) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = per_w[f"w{r['w']:g}"]
        mark = "" if r["in_training_range"] else " *"
        lines.append(
            f"| {r['w']:g}{mark} | {_ci(e['accuracy_unguided'], '.3f')} | {_ci(e['accuracy_cfg'], '.3f')} | "
            f"{_ci(e['accuracy_agd'], '.3f')} | {_ci(e['accuracy_drop_points'], '.1f')} | "
            f"{e['mcnemar']['p_value']:.2g} | {_ci(e['guidance_recovered'], '.2f')} | {_ci(e.get('fid_cfg'), '.1f')} | "
            f"{_ci(e.get('fid_agd'), '.1f')} | {_ci(e.get('fid_ratio_agd_over_cfg'), '.2f')} | "
            f"{_ci(e.get('fidelity_ratio'), '.3f')} |")
    return "\n".join(lines)


def speed_table(speed: dict) -> str:
    """Images per second per batch size: median (min-max) over interleaved repeats, and the paired
    ratios; a row whose AGD / CFG median lies over 15 % above the evaluation-count ceiling is shown
    as noise, not as a result."""
    def spread(values: dict, spec: str, suffix: str = "") -> str:
        return f"{values['median']:{spec}}{suffix} ({values['min']:{spec}}–{values['max']:{spec}})"

    lines = ["| batch | repeats | img/s unguided | img/s CFG | img/s AGD | AGD / CFG | AGD time / unguided time "
             "| CFG time / unguided time |", "|---|---|---|---|---|---|---|---|"]
    for batch, r in sorted(speed["per_batch"].items(), key=lambda item: int(item[0])):
        ratio = ("above the ceiling: noise, not a result" if r["above_ceiling"]
                 else spread(r["speed_ratio_agd_over_cfg"], ".2f", "x"))
        lines.append(f"| {batch} | {r['repeats']} | {spread(r['images_per_second_unguided'], '.0f')} | "
                     f"{spread(r['images_per_second_cfg'], '.0f')} | {spread(r['images_per_second_agd'], '.0f')} | "
                     f"{ratio} | {spread(r['time_ratio_agd_over_unguided'], '.2f')} | "
                     f"{spread(r['time_ratio_cfg_over_unguided'], '.2f')} |")
    return "\n".join(lines)


def second_judge_table(rows: list[dict], second: dict) -> str:
    """The second judge's view of the same samples: its accuracies, the drop, how often it agrees
    with the first judge, and the fidelity ratio in its own feature space."""
    lines = ["| w | acc unguided | acc CFG | acc AGD | drop AGD vs CFG (points) | judges agree on CFG | judges agree "
             "on AGD | FID(AGD,CFG) / FID(unguided,CFG) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tag = f"w{r['w']:g}"
        e = second["per_w"][tag]
        mark = "" if r["in_training_range"] else " *"
        agree = second["agreement"]
        lines.append(f"| {r['w']:g}{mark} | {_ci(e['accuracy_unguided'], '.3f')} | {_ci(e['accuracy_cfg'], '.3f')} | "
                     f"{_ci(e['accuracy_agd'], '.3f')} | {_ci(e['accuracy_drop_points'], '.1f')} | "
                     f"{_ci(agree[f'cfg_{tag}'], '.3f')} | {_ci(agree[f'agd_{tag}'], '.3f')} | "
                     f"{_ci(e.get('fidelity_ratio'), '.3f')} |")
    return "\n".join(lines)
