"""Render the results blocks of the documentation from the evaluate stage's metrics.json.

The block between <!-- results:start --> and <!-- results:end --> (the results table, the in-range
summary that follows it, and the links to the sample grid and curves that the same evaluate run
wrote) is generated here, so the numbers and figures come from one run and cannot drift apart. A
block is rewritten in whichever markdown file holds its markers: README.md or one of docs/**/*.md
(exactly one may; --readme names the file instead). Run it after `dvc repro` (or
`python -m stages.evaluate`); --check only compares and exits 1 when the block is out of date."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from agd_pipeline.results import (ci_text, evidence_table, real_model_table, results_table, second_judge_table,
                                  speed_table)

START = "<!-- results:start -->"
END = "<!-- results:end -->"


def markers(block: str = "") -> tuple[str, str]:
    """The README markers of a results block: the class default's, or a named one (``text-sd``)."""
    return (START, END) if not block else (f"<!-- results:{block}:start -->", f"<!-- results:{block}:end -->")
NOTICE = "<!-- written by `python -m stages.report` from {metrics}; edit the renderer, not this block -->"


class ReportError(Exception):
    pass


def markdown_files(root: Path = Path(".")) -> list[Path]:
    """The markdown files that may hold a generated block: README.md and docs/**/*.md under root."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    if (root / "docs").is_dir():
        files += sorted((root / "docs").rglob("*.md"))
    return files


def block_file(start: str, root: Path = Path(".")) -> Path:
    """The one markdown file (README.md or docs/**/*.md) holding the start marker ``start``."""
    holders = []
    for path in markdown_files(root):
        try:
            if start in path.read_text(encoding="utf-8"):
                holders.append(path)
        except (OSError, UnicodeDecodeError) as err:
            raise ReportError(f"cannot read {path} ({err})") from None
    if not holders:
        raise ReportError(f"no markdown file holds {start}: looked in README.md and docs/**/*.md under "
                          f"{root.resolve()} (--readme names a file)")
    if len(holders) > 1:
        raise ReportError(f"{start} is in {len(holders)} files ({', '.join(p.as_posix() for p in holders)}); "
                          "a block belongs in exactly one")
    return holders[0]


def default_metrics(params: str | os.PathLike = "params.yaml") -> Path:
    """metrics.json in params.yaml's evaluate.out_dir (data/eval when unset)."""
    out_dir = "data/eval"
    try:
        section = (yaml.safe_load(Path(params).read_text()) or {}).get("evaluate") or {}
        out_dir = section.get("out_dir") or out_dir
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return Path(out_dir) / "metrics.json"


def _w(value: float) -> str:
    return f"{value:g}"


def _span(values, spec: str, suffix: str = "") -> str:
    low, high = min(values), max(values)
    return f"{low:{spec}}{suffix}" if format(low, spec) == format(high, spec) else \
        f"{low:{spec}}–{high:{spec}}{suffix}"


def render(metrics: dict, metrics_path: str, link_root: Path, block: str = "") -> str:
    """The block's text (markers included). Image links are relative to link_root (README's folder)."""
    start, end = markers(block)
    try:
        rows = list(metrics["per_w"].values())
        low, high = metrics["training_range"]
        steps, samples = metrics["num_steps"], metrics["samples_per_w"]
        summary = metrics["summary_in_training_range"]
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{metrics_path} is not a metrics file of the evaluate stage (missing {err})") from None
    if not rows:
        raise ReportError(f"{metrics_path} holds no guidance scale")
    if "summary" in metrics.get("evidence", {}):
        return render_evidence(metrics, metrics_path, link_root, block)
    inside = [r for r in rows if r["in_training_range"]] or rows
    outside = [r for r in rows if not r["in_training_range"]]
    has_classifier = rows[0].get("accuracy_cfg") is not None
    out_dir = Path(metrics_path).parent

    text_model = metrics.get("conditioning") == "text"
    what = "prompt accuracy" if text_model else "class accuracy"
    lines = [start, NOTICE.format(metrics=f"`{Path(metrics_path).as_posix()}`"), "",
             f"From `{Path(metrics_path).as_posix()}`: {samples} samples per w, {steps} sampling steps; "
             f"`*` marks a w outside the training range U[{_w(low)}, {_w(high)}].", "",
             results_table(rows), ""]
    if has_classifier:
        lines.append(f"The unguided model reaches a {what} of {rows[0]['accuracy_unguided']:.3f}; CFG "
                     f"reaches {_span([r['accuracy_cfg'] for r in inside], '.3f')} in the training range. "
                     "Across the in-range w, AGD:")
    else:
        lines.append("Across the in-range w, AGD:")
    lines += ["", *(f"- {b}" for b in _bullets(inside, summary, has_classifier)), ""]
    if outside and has_classifier:
        inside_max = max(r["fid_to_cfg_agd"] for r in inside)
        parts = [f"at w = {_w(r['w'])}, FID(AGD, CFG) is {r['fid_to_cfg_agd']:.2f} (at most {inside_max:.2f} "
                 f"inside the range) and AGD's accuracy {r['accuracy_agd']:.3f} against CFG's "
                 f"{r['accuracy_cfg']:.3f}" for r in outside]
        lines += [f"Outside the training range: {'; '.join(parts)}.", ""]
    negative = metrics.get("negative_prompt_check")
    if negative:
        rates = negative["negative_digit_rate"]
        ratio = negative["avoidance_ratio_agd_over_cfg"]
        lines += [f"Negative-prompt check (w = {_w(negative['w'])}, prompt \"{negative['prompt']}\", the negative "
                  f"prompt naming a digit, {negative['samples_per_digit']} samples per digit): that digit appears in "
                  f"{100 * rates['unguided']:.1f} % of unguided samples, {100 * rates['cfg']:.1f} % with CFG and "
                  f"{100 * rates['agd']:.1f} % with AGD; AGD avoids it "
                  + (f"{ratio:.2f} times as well as CFG." if ratio is not None else "(CFG does not avoid it)."), ""]
    lines += _real_model(metrics, rows)
    if "targets_met" in summary:
        lines += [f"`summary_in_training_range.targets_met`: `{str(summary['targets_met']).lower()}`.", ""]
    if has_classifier:
        lines += _figures(inside, out_dir, link_root, bool(negative))
    lines.append(end)
    return "\n".join(lines)


TARGET_NAMES = {"accuracy_drop": "accuracy drop of AGD below CFG, worst in-range w (points)",
                "guidance_recovered": "guidance recovered, pooled over the in-range w",
                "fid_ratio": "FID against real data, AGD / CFG, every in-range w",
                "fidelity": "FID(AGD, CFG) / FID(unguided, CFG), worst in-range w",
                "speed": "AGD / CFG images per second at the evaluation batch",
                "negative": "negative-prompt avoidance, AGD / CFG"}


def _share(metrics: dict) -> str:
    """What the adapters cost: their parameters and their share of the base's."""
    adapters = metrics.get("adapters") or {}
    if "adapter" not in adapters or "share" not in adapters:
        return "unrecorded size"
    return f"{adapters['adapter']:,} parameters, {100 * adapters['share']:.1f} % of the base's"


def _bound(value) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return f"{value:.4g}"


def render_evidence(metrics: dict, metrics_path: str, link_root: Path, block: str = "") -> str:
    """The block of a run with per-sample outcomes: results with 95 % intervals, the targets judged
    on their bounds, and speed from interleaved repeats."""
    start, end = markers(block)
    rows = list(metrics["per_w"].values())
    low, high = metrics["training_range"]
    evid, speed = metrics["evidence"], metrics["speed"]
    boot, summary = evid["bootstrap"], evid["summary"]
    inside = [r for r in rows if r["in_training_range"]] or rows
    drawn = "prompts" if boot["clusters"] == "prompt" else "samples"
    lines = [start, NOTICE.format(metrics=f"`{Path(metrics_path).as_posix()}`"), "",
             f"From `{Path(metrics_path).as_posix()}`: the **{metrics.get('split', 'validation')} split**, "
             f"{metrics['samples_per_w']:,} samples per w, {metrics['num_steps']} sampling steps; adapters of "
             f"{_share(metrics)}; `*` marks a w "
             f"outside the training range U[{_w(low)}, {_w(high)}]. Brackets hold 95 % intervals: a paired bootstrap "
             f"over {drawn} ({boot['replicates']:,} replicates; the same draw for every method and w, the real "
             "reference set drawn on its own; FID intervals bias-corrected). McNemar p: exact test of CFG against AGD "
             "on the same seeds.", "",
             evidence_table(rows, evid["per_w"]), "",
             "Targets, each judged on the end of its interval that could fail it (each quality target is one the "
             "unguided model fails):",
             "", "| target | estimate [95 % interval] | judged on | bound | met |", "|---|---|---|---|---|"]
    drop = summary["max_accuracy_drop_points"]
    estimates = {"accuracy_drop": f"{drop['point']:.2f} [{drop['low']:.2f}, {drop['high']:.4g}] (w = {_w(drop['w'])})",
                 "guidance_recovered": _ci_text(summary["guidance_recovered"], ".3f")}
    if "fid_ratio_agd_over_cfg" in summary:
        ratio = summary["fid_ratio_agd_over_cfg"]
        estimates["fid_ratio"] = (f"{ratio['min_point']:.2f}–{ratio['max_point']:.2f} "
                                  f"[{ratio['low']:.2f}, {ratio['high']:.2f}]")
        fidelity = summary["max_fidelity_ratio"]
        estimates["fidelity"] = (f"{fidelity['point']:.3f} [{fidelity['low']:.3f}, {fidelity['high']:.3f}] "
                                 f"(w = {_w(fidelity['w'])})")
    targets = dict(summary["targets"])
    main = speed["per_batch"][speed["evaluation_batch"]]["speed_ratio_agd_over_cfg"]
    targets["speed"], estimates["speed"] = speed["target"], (f"{main['median']:.2f}x (min {main['min']:.2f}x over "
                                                             f"{speed['per_batch'][speed['evaluation_batch']]['repeats']}"
                                                             " repeats)")
    if "negative" in evid:
        targets["negative"] = evid["negative"]["target"]
        estimates["negative"] = _ci_text(evid["negative"]["avoidance_ratio_agd_over_cfg"], ".2f")
    for name, target in targets.items():
        lines.append(f"| {TARGET_NAMES[name]} | {estimates[name]} | {target['limit']} | {_bound(target['bound'])} | "
                     f"{'yes' if target['met'] else '**no**'} |")
    second = evid.get("second_judge")
    if second is not None:
        about = metrics.get("second_judge", {})
        verdicts = ", ".join(f"{name.replace('_', ' ')} {'met' if t['met'] else 'not met'} "
                             f"(bound {_bound(t['bound'])})" for name, t in second["summary"]["targets"].items())
        lines += ["", f"A second judge, {about.get('architecture', 'another classifier')}, trained on "
                  f"{about.get('trained_on', 'other data')} (accuracy "
                  f"{about.get('accuracy_on_its_reference_digits', float('nan')):.3f} on {about.get('fid_reference')}, "
                  "its FID reference), scores the same samples; under it the same targets read: "
                  f"{verdicts}.", "", second_judge_table(rows, second)]
    if "real_model" in evid:
        lines += ["", *_real_model(metrics, rows)[:-1]]
    lines += ["", f"Speed: images per second from {speed['per_batch'][speed['evaluation_batch']]['repeats']} "
              "interleaved repeats in one warm process, median (min–max); the methods take turns within a repeat. "
              f"CFG makes {speed['nfe_per_image']['cfg']} network evaluations per image, AGD "
              f"{speed['nfe_per_image']['agd']}: {speed['ceiling_agd_over_cfg']:.2f}x in evaluations. "
              + _measured_ceiling(speed), "",
              speed_table(speed), ""]
    met = metrics["summary_in_training_range"]["targets_met"]
    lines += [f"`summary_in_training_range.targets_met`: `{str(met).lower()}`.", ""]
    lines += _figures(inside, Path(metrics_path).parent, link_root, "negative_prompt_check" in metrics)
    lines.append(end)
    return "\n".join(lines)


def _real_model(metrics: dict, rows: list[dict]) -> list[str]:
    """The real-model metrics with their intervals (Inception FID, CLIP score), where the run has them."""
    evid = metrics.get("evidence", {})
    real = evid.get("real_model")
    if not real:
        return []
    boot = evid["bootstrap"]
    reference = real.get("fid_reference")
    about = ""
    if reference is not None:
        about = (f" Inception FID against {reference['images']:,} reference images, drawn on their own; "
                 if reference["kind"] == "images" else
                 " Inception FID against precomputed reference statistics, which stay fixed: only the samples are "
                 "drawn, so the intervals leave out the reference's own sampling error; ")
        about += "FID intervals bias-corrected."
    return [f"Real-model metrics (reported, not judged). Brackets hold 95 % intervals from the same paired bootstrap "
            f"over {'prompts' if boot['clusters'] == 'prompt' else 'samples'} ({boot['replicates']:,} "
            f"replicates).{about}", "", real_model_table(rows, real), ""]


def _ci_text(estimate: dict, spec: str) -> str:
    return ci_text(estimate, spec, undefined="undefined (CFG gains nothing over the unguided model)")


def _bullets(inside: list[dict], summary: dict, has_classifier: bool) -> list[str]:
    """What AGD does across the in-range w: accuracy, FID, closeness to CFG (with a classifier), speed."""
    bullets = []
    if has_classifier:
        worst = max(inside, key=lambda r: r["accuracy_cfg"] - r["accuracy_agd"])
        drop = 100 * (worst["accuracy_cfg"] - worst["accuracy_agd"])
        if drop > 0:
            bullets.append(f"matches CFG's accuracy to within {drop:.1f} point{'s' if drop >= 1.05 else ''} "
                           f"(the worst case is w = {_w(worst['w'])}: {worst['accuracy_agd']:.3f} against "
                           f"{worst['accuracy_cfg']:.3f});")
        else:
            bullets.append("is at least as accurate as CFG at every in-range w;")
        ratios = [r["fid_agd"] / r["fid_cfg"] for r in inside]
        lower = sum(ratio < 1 for ratio in ratios)
        where = ("lower than CFG's at every in-range w" if lower == len(inside) else
                 f"lower than CFG's at {lower} of {len(inside)} in-range w")
        bullets.append(f"has an FID against real data at most {max(ratios):.2f} times CFG's ({where});")
        worst = max(inside, key=lambda r: r["fid_to_cfg_agd"] / r["fid_to_cfg_unguided"])
        bullets.append("is much closer to CFG than the unguided model is: FID(AGD, CFG) is at most "
                       f"{summary['max_fidelity_ratio']:.3f} of FID(unguided, CFG) (w = {_w(worst['w'])}: "
                       f"{worst['fid_to_cfg_agd']:.2f} against {worst['fid_to_cfg_unguided']:.2f});")
    nfe_cfg, nfe_agd = inside[0]["nfe_per_image_cfg"], inside[0]["nfe_per_image_agd"]
    bullets.append(f"samples {_span([r['speed_ratio_agd_over_cfg'] for r in inside], '.2f', 'x')} as many "
                   f"images per second as CFG ({summary['speed_ratio_agd_over_cfg']:.2f}x over all in-range w "
                   f"together), at 1 network evaluation per step ({nfe_agd} per image) against CFG's 2 ({nfe_cfg} per "
                   "image).")
    return bullets


def _figures(inside: list[dict], out_dir: Path, link_root: Path, negative: bool = False) -> list[str]:
    """The grid at w = 4 (or the nearest evaluated w) and the curves, linked from the evaluate stage's
    own files."""
    def link(name: str) -> str:
        # out_dir is relative to link_root, the folder of the file holding the block
        return Path(os.path.relpath(os.path.join(link_root, out_dir, name), link_root)).as_posix()

    shown = _w(min(inside, key=lambda r: abs(r["w"] - 4.0))["w"])
    grid = link(f"grids/w{shown}.png")  # evaluate names each grid after its w
    figures = [f"Same seeds, w = {shown}: unguided | CFG | AGD", "",
               f"![unguided, CFG and AGD samples at w = {shown}]({grid})", "",
               f"![FID and accuracy against w]({link('curves.png')})"]
    if negative:
        figures += ["", "![negative prompt naming each row's digit: unguided, CFG, AGD]"
                    f"({link('grids/negative_prompt.png')})"]
    return figures


def replace_block(text: str, block: str, readme: str, name: str = "") -> str:
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ReportError(f"{readme} needs exactly one {start} followed by one {end}")
    return text[:text.index(start)] + block + text[text.index(end) + len(end):]


def model_card(folder: str, metrics: dict, metrics_path: Path) -> int:
    """The adapter folder's model card, rewritten with the evaluation numbers."""
    from agd_pipeline.adapters import read_adapter_config
    from agd_pipeline.modelcard import write_model_card
    from agd_pipeline.errors import AgdError

    try:
        config = read_adapter_config(folder)
        path = write_model_card(folder, config, metrics)
    except (AgdError, KeyError, TypeError) as err:
        raise ReportError(f"{folder}: cannot write its model card ({err})") from None
    except OSError as err:
        raise ReportError(f"{folder}: cannot write its model card ({err.strerror})") from None
    print(f"{path}: model card with the evaluation numbers of {metrics_path}")
    return 0


# each default's reported variants: {name: (README markers, {label: metrics.json})}; the seed runs are
# those whose label starts with "seed"
VARIANT_SETS = {
    "class": (("<!-- variants:start -->", "<!-- variants:end -->"),  # pipelines/variants/dvc.yaml
              {"seed 0 (the default)": "data/eval/metrics.json",
               "seed 1": "data/variants/seed-1/eval/metrics.json",
               "seed 2": "data/variants/seed-2/eval/metrics.json",
               "paper share (width 8, embed 16), seed 0": "data/variants/share-2pct/eval/metrics.json"}),
    "sd3": (("<!-- variants:sd3:start -->", "<!-- variants:sd3:end -->"),  # pipelines/variants-sd3/dvc.yaml
            {"seed 0 (the default)": "data/text/sd3/eval/metrics.json",
             "seed 1": "data/variants-sd3/seed-1/eval/metrics.json",
             "seed 2": "data/variants-sd3/seed-2/eval/metrics.json",
             "paper share (width 8, embed 16), seed 0": "data/variants-sd3/share-2pct/eval/metrics.json"}),
}


def _measured_ceiling(speed: dict) -> str:
    """The ceiling the speed guard uses, as a sentence (runs made before it was recorded: none)."""
    measured = speed.get("measured_ceiling_agd_over_cfg")
    if measured is None:
        return ""
    return (f"Measured in the same repeats, CFG took {measured:.2f}x the unguided model's time at batch "
            f"{speed['evaluation_batch']}: the most adapters that cost nothing could reach (a median AGD / CFG "
            "more than 15 % above it would mean AGD ran faster than the unguided model: noise, not a result).")


def render_variants(runs: dict[str, Path], markers: tuple[str, str]) -> str:
    """The variants block: each run's adapter share and in-range claims with their intervals and
    targets (text runs: the negative-prompt check too), then the mean and standard deviation of the
    seed runs' point estimates. A speed above the measured ceiling is marked as not trusted."""
    import statistics

    loaded = {}
    for label, path in runs.items():
        try:
            metrics = json.loads(path.read_text())
            loaded[label] = (metrics, metrics["evidence"]["summary"], metrics["adapters"]["share"])
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ReportError(f"{path}: not an evaluate run with intervals ({err})") from None
    negative = all("negative" in metrics["evidence"] for metrics, _, _ in loaded.values())
    lines = [markers[0], NOTICE.format(metrics=", ".join(f"`{p.as_posix()}`" for p in runs.values())), "",
             "| adapters | share of base | worst acc drop (points) | guidance recovered | FID AGD / CFG (range "
             "over w) | FID(AGD,CFG) / FID(unguided,CFG) | " + ("negative avoidance AGD / CFG | " if negative else "")
             + "speed AGD / CFG | targets met |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if negative else "")]
    seeds = {"drop": [], "recovered": [], "fidelity": []}
    for label, (metrics, summary, share) in loaded.items():
        drop, recovered = summary["max_accuracy_drop_points"], summary["guidance_recovered"]
        ratio, fidelity = summary["fid_ratio_agd_over_cfg"], summary["max_fidelity_ratio"]
        timed = metrics["speed"]["per_batch"][metrics["speed"]["evaluation_batch"]]
        speed = timed["speed_ratio_agd_over_cfg"]
        speed_text = f"{speed['median']:.2f}x (min {speed['min']:.2f}x)"
        if timed.get("above_ceiling"):
            speed_text += (f", above the {timed['time_ratio_cfg_over_unguided']['median']:.2f}x measured ceiling: "
                           "not trusted")
        avoidance = ""
        if negative:
            avoidance = _ci_text(metrics["evidence"]["negative"]["avoidance_ratio_agd_over_cfg"], ".2f") + " | "
        if label.startswith("seed"):
            seeds["drop"].append(drop["point"])
            seeds["recovered"].append(recovered["point"])
            seeds["fidelity"].append(fidelity["point"])
        lines.append(f"| {label} | {100 * share:.1f} % | {drop['point']:.2f} [{drop['low']:.2f}, {drop['high']:.4g}] | "
                     f"{_ci_text(recovered, '.3f')} | {ratio['min_point']:.2f}–{ratio['max_point']:.2f} "
                     f"[{ratio['low']:.2f}, {ratio['high']:.2f}] | {fidelity['point']:.3f} [{fidelity['low']:.3f}, "
                     f"{fidelity['high']:.3f}] | {avoidance}{speed_text} | "
                     f"{'yes' if metrics['summary_in_training_range']['targets_met'] else 'no'} |")
    if len(seeds["drop"]) > 1:
        def spread(values, spec):
            return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"
        lines += ["", f"Over the {len(seeds['drop'])} training seeds (mean ± standard deviation of the point "
                  f"estimates): worst accuracy drop {spread(seeds['drop'], '.2f')} points, guidance recovered "
                  f"{spread(seeds['recovered'], '.3f')}, FID(AGD,CFG) / FID(unguided,CFG) "
                  f"{spread(seeds['fidelity'], '.3f')}."]
    lines.append(markers[1])
    return "\n".join(lines)


# the embedded defaults, one row each in the defaults block: (label, denoiser, metrics.json, docs page)
DEFAULTS = (
    ("class (DiT)", "`DiTTransformer2DModel`, class-conditional digits", "data/eval/metrics.json",
     "docs/class-default.md"),
    ("SD", "UNet with cross-attention, one CLIP encoder", "data/text/sd/eval/metrics.json",
     "docs/text-defaults.md#sd-unet-with-cross-attention"),
    ("SDXL", "UNet, two CLIP encoders, pooled embedding", "data/text/sdxl/eval/metrics.json",
     "docs/text-defaults.md#sdxl-two-text-encoders-pooled-embedding-time-ids"),
    ("SD3", "joint-attention transformer, flow matching", "data/text/sd3/eval/metrics.json",
     "docs/text-defaults.md#sd3-joint-attention-transformer-flow-matching"),
)
DEFAULTS_MARKERS = ("<!-- results:defaults:start -->", "<!-- results:defaults:end -->")


def render_defaults(link_root: Path, root: Path = Path(".")) -> str:
    """One row per embedded default: its in-range claims with their 95 % intervals, judged on the bounds,
    from each default's tracked metrics.json; links relative to link_root (the holding file's folder)."""
    start, end = DEFAULTS_MARKERS
    lines = [start, NOTICE.format(metrics=", ".join(f"`{m}`" for _, _, m, _ in DEFAULTS)), "",
             "| default | denoiser | worst acc drop, points (target) | guidance recovered | "
             "FID(AGD,CFG) / FID(unguided,CFG) | negative avoidance AGD / CFG | speed AGD / CFG | targets met | "
             "details |",
             "|---|---|---|---|---|---|---|---|---|"]
    splits, sizes = set(), []
    for label, denoiser, metrics_path, page in DEFAULTS:
        path = root / metrics_path
        try:
            metrics = json.loads(path.read_text())
            summary = metrics["evidence"]["summary"]
            drop, recovered = summary["max_accuracy_drop_points"], summary["guidance_recovered"]
            fidelity = summary["max_fidelity_ratio"]
            tolerance = metrics["evidence"]["accuracy_tolerance"]
            timed = metrics["speed"]["per_batch"][metrics["speed"]["evaluation_batch"]]
            splits.add(metrics["split"])
            sizes.append(f"{label} {metrics['samples_per_w']:,}")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ReportError(f"{path}: not an evaluate run with intervals ({err})") from None
        speed = timed["speed_ratio_agd_over_cfg"]
        speed_text = f"{speed['median']:.2f}x (min {speed['min']:.2f}x)"
        if timed.get("above_ceiling"):
            speed_text += ", above the ceiling: not trusted"
        negative = metrics["evidence"].get("negative")
        avoidance = _ci_text(negative["avoidance_ratio_agd_over_cfg"], ".2f") if negative else "–"
        link = os.path.relpath((root / page.split("#")[0]).resolve(), link_root.resolve()).replace(os.sep, "/")
        link += "#" + page.split("#")[1] if "#" in page else ""
        lines.append(f"| {label} | {denoiser} | {drop['point']:.1f} [{drop['low']:.1f}, {drop['high']:.1f}] "
                     f"(<= {tolerance:g}) | {_ci_text(recovered, '.3f')} | {fidelity['point']:.3f} "
                     f"[{fidelity['low']:.3f}, {fidelity['high']:.3f}] | {avoidance} | {speed_text} | "
                     f"{'yes' if metrics['summary_in_training_range']['targets_met'] else 'no'} | [results]({link}) |")
    lines += ["", f"Each row is one evaluate run on the {' and '.join(sorted(splits))} split (samples per w: "
              f"{', '.join(sizes)}), worst case over the in-range w. Brackets hold "
              "95 % intervals (paired bootstrap); a target is met when the end of its interval that could fail it "
              "is: accuracy drop of AGD below CFG at most the tolerance shown, guidance recovered at least 0.9, "
              "FID(AGD,CFG) / FID(unguided,CFG) at most 0.25, negative-prompt avoidance at least 0.8 of CFG's, "
              "the slowest repeat at least 1.8x CFG's images per second; \"targets met\" also needs AGD's FID "
              "against real data within 10 % of CFG's.", end]
    return "\n".join(lines)


def defaults_main(readme: Path | None, check: bool) -> int:
    try:
        readme = readme or block_file(DEFAULTS_MARKERS[0])
        text = readme.read_text()
        block = render_defaults(readme.resolve().parent)
        updated = replace_block(text, block, str(readme), "defaults")
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if check:
        if updated != text:
            print(f"{readme}: the defaults block is out of date: run `python -m stages.report --defaults`",
                  file=sys.stderr)
            return 1
        print(f"{readme}: the defaults block matches the {len(DEFAULTS)} defaults' metrics")
        return 0
    if updated != text:
        readme.write_text(updated)
        print(f"{readme}: defaults block rewritten from {len(DEFAULTS)} metrics files")
    return 0


def recomputed_differences(metrics: dict, metrics_path: Path) -> list[str]:
    """Every interval and target of a run with per-sample files, recomputed from those files and
    compared with metrics.json (none for a run that predates them)."""
    if "evidence" not in metrics:
        return []
    from agd_pipeline.evidence import EvidenceError, assess_folder, differences

    try:
        again = assess_folder(metrics_path.parent, metrics)
    except (EvidenceError, KeyError, OSError, ValueError) as err:
        return [f"cannot recompute ({err})"]
    return (differences(metrics["evidence"], again["evidence"], "evidence")
            + differences(metrics["speed"], again["speed"], "speed"))


def variants_main(name: str, readme: Path | None, check: bool) -> int:
    markers, labelled = VARIANT_SETS[name]
    runs = {label: Path(p) for label, p in labelled.items()}
    paths = list(runs.values())
    try:
        readme = readme or block_file(markers[0])
        text = readme.read_text()
        start, end = markers
        if text.count(start) != 1 or text.count(end) != 1:
            raise ReportError(f"{readme} needs exactly one {start} followed by one {end}")
        updated = text[:text.index(start)] + render_variants(runs, markers) + text[text.index(end) + len(end):]
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if check:
        for path in paths:  # each run's intervals follow from its own per-sample files
            stale = recomputed_differences(json.loads(path.read_text()), path)
            if stale:
                print(f"{path}: the stored intervals differ from those recomputed from the per-sample files:\n  "
                      + "\n  ".join(stale[:10]), file=sys.stderr)
                return 1
        if updated != text:
            print(f"{readme}: the {name} variants block is out of date: run `python -m stages.report "
                  f"--variants {name}`", file=sys.stderr)
            return 1
        print(f"{readme}: the {name} variants block matches {len(paths)} runs")
        return 0
    readme.write_text(updated)
    print(f"{readme}: {name} variants block rewritten from {len(paths)} runs")
    return 0


def main(argv=None) -> int:
    """Ctrl-C, SIGTERM or SIGHUP: one line, exit status 130, 143 or 129 (agd_pipeline.interrupts)."""
    from agd_pipeline.interrupts import interruptible

    return interruptible(lambda: _main(argv), "re-run the same `python -m stages.report` command")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", default=None,
                        help="metrics.json of the evaluate stage (default: evaluate.out_dir of params.yaml, "
                        "data/eval/metrics.json)")
    parser.add_argument("--readme", default=None,
                        help="file holding the block's markers (default: the one of README.md and docs/**/*.md "
                        "that holds them)")
    parser.add_argument("--block", default="", help="a named results block, e.g. text-sd for "
                        "<!-- results:text-sd:start --> (default: the class default's block)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the block differs from the render of the metrics")
    parser.add_argument("--variants", nargs="?", const="class", choices=sorted(VARIANT_SETS), default=None,
                        help="instead, rewrite the block of a default's reported variants (training seeds, "
                        "paper share): class (the default when given alone; pipelines/variants/dvc.yaml) or sd3 "
                        "(pipelines/variants-sd3/dvc.yaml)")
    parser.add_argument("--defaults", action="store_true",
                        help="instead, rewrite the block of one row per embedded default (class, SD, SDXL, SD3) "
                        "from their tracked metrics.json")
    parser.add_argument("--model-card", metavar="ADAPTERS", default=None,
                        help="instead, rewrite the README.md model card of this adapter folder with the "
                        "evaluation numbers (for publishing; under DVC, `dvc commit train` afterwards)")
    args = parser.parse_args(argv)
    metrics_path = Path(args.metrics) if args.metrics else default_metrics()
    readme = Path(args.readme) if args.readme else None
    if args.variants:
        return variants_main(args.variants, readme, args.check)
    if args.defaults:
        return defaults_main(readme, args.check)
    try:
        try:
            metrics = json.loads(metrics_path.read_text())
        except OSError as err:
            raise ReportError(f"cannot read {metrics_path} ({err.strerror}): run `dvc repro` or "
                              "`python -m stages.evaluate` first") from None
        except json.JSONDecodeError as err:
            raise ReportError(f"{metrics_path} is not valid JSON ({err})") from None
        if args.model_card:
            return model_card(args.model_card, metrics, metrics_path)
        readme = readme or block_file(markers(args.block)[0])
        try:
            text = readme.read_text()
        except OSError as err:
            raise ReportError(f"cannot read {readme} ({err.strerror})") from None
        link_root = readme.resolve().parent
        block = render(metrics, os.path.relpath(metrics_path.resolve(), link_root), link_root, args.block)
        updated = replace_block(text, block, str(readme), args.block)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        stale = recomputed_differences(metrics, metrics_path)
        if stale:
            print(f"{metrics_path}: the stored intervals differ from those recomputed from the per-sample files:\n  "
                  + "\n  ".join(stale[:10]), file=sys.stderr)
            return 1
        if updated != text:
            print(f"{readme} is out of date with {metrics_path}: run `python -m stages.report`", file=sys.stderr)
            return 1
        print(f"{readme} matches {metrics_path}")
        return 0
    if updated == text:
        print(f"{readme} already matches {metrics_path}")
    else:
        readme.write_text(updated)
        print(f"{readme}: results block rewritten from {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
