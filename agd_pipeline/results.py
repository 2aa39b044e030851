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


def ci_text(estimate: dict | None, spec: str, undefined: str = "-") -> str:
    """'point [low, high]' of an evidence estimate; ``undefined`` where it has none."""
    if not estimate or estimate.get("point") is None:
        return undefined
    return f"{estimate['point']:{spec}} [{estimate['low']:{spec}}, {estimate['high']:{spec}}]"



def evidence_table(rows: list[dict], per_w: dict) -> str:
    """The results table with 95 % intervals: one row per w of ``metrics.json``'s ``per_w``, the
    intervals from its ``evidence.per_w`` (``*``: outside the training range)."""
    lines = ["| w | acc unguided | acc CFG | acc AGD | drop AGD vs CFG (points) | McNemar p | guidance recovered "
             "| FID CFG | FID AGD | FID AGD / CFG | FID(AGD,CFG) / FID(unguided,CFG) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = per_w[f"w{r['w']:g}"]
        mark = "" if r["in_training_range"] else " *"
        cells = [f"{r['w']:g}{mark}", *_estimates(e, ACCURACY_COLUMNS), f"{e['mcnemar']['p_value']:.2g}",
                 *_estimates(e, FID_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ACCURACY_COLUMNS = (("accuracy_unguided", ".3f"), ("accuracy_cfg", ".3f"), ("accuracy_agd", ".3f"),
                    ("accuracy_drop_points", ".1f"))
FID_COLUMNS = (("guidance_recovered", ".2f"), ("fid_cfg", ".1f"), ("fid_agd", ".1f"),
               ("fid_ratio_agd_over_cfg", ".2f"), ("fidelity_ratio", ".3f"))


def _estimates(row: dict, columns) -> list[str]:
    return [ci_text(row.get(key), spec) for key, spec in columns]


REAL_MODEL_COLUMNS = (("inception_fid_unguided", "Inception FID unguided", ".2f"),
                      ("inception_fid_cfg", "Inception FID CFG", ".2f"),
                      ("inception_fid_agd", "Inception FID AGD", ".2f"),
                      ("inception_fid_ratio_agd_over_cfg", "Inception FID AGD / CFG", ".3f"),
                      ("clip_score_unguided", "CLIP unguided", ".2f"), ("clip_score_cfg", "CLIP CFG", ".2f"),
                      ("clip_score_agd", "CLIP AGD", ".2f"),
                      ("clip_score_difference_agd_minus_cfg", "CLIP AGD − CFG", ".2f"))


def real_model_table(rows: list[dict], real: dict) -> str:
    """The real-model metrics with 95 % intervals (``evidence.real_model`` of metrics.json): one row
    per w, a column per metric the run measured (Inception FID, CLIP score)."""
    first = real["per_w"][f"w{rows[0]['w']:g}"]
    columns = [(key, title, spec) for key, title, spec in REAL_MODEL_COLUMNS if key in first]
    lines = ["| w | " + " | ".join(title for _, title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        e = real["per_w"][f"w{r['w']:g}"]
        mark = "" if r["in_training_range"] else " *"
        lines.append("| " + " | ".join([f"{r['w']:g}{mark}", *(ci_text(e.get(key), spec) for key, _, spec in columns)])
                     + " |")
    return "\n".join(lines)


def speed_table(speed: dict) -> str:
    """Images per second per batch size: median (min-max) over interleaved repeats, and the paired
    ratios; a row whose AGD / CFG median lies over 15 % above the measured ceiling (CFG time over
    unguided time: AGD faster than the unguided model) is shown as noise, not as a result."""
    def spread(values: dict, spec: str, suffix: str = "") -> str:
        return f"{values['median']:{spec}}{suffix} ({values['min']:{spec}}–{values['max']:{spec}})"

    lines = ["| batch | repeats | img/s unguided | img/s CFG | img/s AGD | AGD / CFG | AGD time / unguided time "
             "| CFG time / unguided time |", "|---|---|---|---|---|---|---|---|"]
    for batch, r in sorted(speed["per_batch"].items(), key=lambda item: int(item[0])):
        ratio = ("above the measured ceiling: noise, not a result" if r["above_ceiling"]
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
        cells = [f"{r['w']:g}{mark}", *_estimates(e, ACCURACY_COLUMNS), ci_text(agree[f"cfg_{tag}"], ".3f"),
                 ci_text(agree[f"agd_{tag}"], ".3f"), ci_text(e.get("fidelity_ratio"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
