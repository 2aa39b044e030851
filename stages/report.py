"""Render the README's results block from the evaluate stage's metrics.json.

The block between <!-- results:start --> and <!-- results:end --> in README.md (the results table,
the in-range summary that follows it, and the links to the sample grid and curves that the same
evaluate run wrote) is generated here, so the numbers and figures come from one run and cannot
drift apart. Run it after `dvc repro` (or `python -m stages.evaluate`); --check only compares and
exits 1 when README.md is out of date."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from agd_pipeline.results import results_table

START = "<!-- results:start -->"
END = "<!-- results:end -->"


def markers(block: str = "") -> tuple[str, str]:
    """The README markers of a results block: the class default's, or a named one (``text-sd``)."""
    return (START, END) if not block else (f"<!-- results:{block}:start -->", f"<!-- results:{block}:end -->")
NOTICE = "<!-- written by `python -m stages.report` from {metrics}; edit the renderer, not this block -->"


class ReportError(Exception):
    pass


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
    if "targets_met" in summary:
        lines += [f"`summary_in_training_range.targets_met`: `{str(summary['targets_met']).lower()}`.", ""]
    if has_classifier:
        lines += _figures(inside, out_dir, link_root, bool(negative))
    lines.append(end)
    return "\n".join(lines)


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
        return Path(os.path.relpath(out_dir / name, link_root)).as_posix()

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
    from agd_pipeline.adapters import read_adapter_config, write_model_card
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", default=None,
                        help="metrics.json of the evaluate stage (default: evaluate.out_dir of params.yaml, "
                        "data/eval/metrics.json)")
    parser.add_argument("--readme", default="README.md", help="file holding the results markers")
    parser.add_argument("--block", default="", help="a named results block, e.g. text-sd for "
                        "<!-- results:text-sd:start --> (default: the class default's block)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the block differs from the render of the metrics")
    parser.add_argument("--model-card", metavar="ADAPTERS", default=None,
                        help="instead, rewrite the README.md model card of this adapter folder with the "
                        "evaluation numbers (for publishing; under DVC, `dvc commit train` afterwards)")
    args = parser.parse_args(argv)
    metrics_path = Path(args.metrics) if args.metrics else default_metrics()
    readme = Path(args.readme)
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
