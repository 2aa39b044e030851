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
