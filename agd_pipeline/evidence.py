"""From per-sample outcomes to claims with intervals: what the evaluate stage concludes, and what
`python -m stages.report --check` recomputes from the tracked files.

Inputs are the evaluate stage's per-sample files: ``outcomes.csv`` (one row per sample, method and
w: the class the judge saw, whether it is the one asked for, the sample's prompt) and
``features.npz`` (the judge's feature vector of every sample, and of the real reference set). One
paired cluster bootstrap (:mod:`agd_pipeline.intervals`) draws prompts once per replicate for every
method and w, so differences and worst cases over w get intervals as well as single numbers.

Targets are judged on the interval's unfavourable end, and each is one the unguided model fails:
- accuracy: the worst in-range drop of AGD below CFG, upper bound <= the tolerance (class 1 point,
  text 2 points);
- guidance recovered: (acc_AGD - acc_unguided) / (acc_CFG - acc_unguided), pooled over the in-range
  w, lower bound >= 0.9 (the unguided model recovers 0);
- FID against real data within 10 % of CFG's either way at every in-range w (both bounds of
  FID_AGD / FID_CFG in [0.9, 1.1]; under-guidance, which lowers FID on these models, fails too);
- fidelity: FID(AGD, CFG) / FID(unguided, CFG), worst in-range w, upper bound <= 0.25 (unguided: 1);
- speed (from :func:`speed_summary`): the smallest AGD / CFG ratio over the repeats at the evaluation
  batch >= 1.8, and AGD not more than 15 % faster than the unguided model in the same repeats
  (it makes the unguided model's evaluations plus the adapters', so a faster AGD is noise);
- text models' negative-prompt check: avoidance of the negative digit relative to CFG's, lower
  bound >= 0.8.

Real checkpoints (``evaluate.fid_reference``, ``evaluate.clip_model``) add ``real_outcomes.csv`` (the
prompt of each sample and, under a CLIP model, its CLIP score) and their Inception features to
``features.npz`` (keys ``inception/...``); from the same draw of prompts come intervals for the
Inception FID of each method at each w, AGD's over CFG's, the CLIP score of each method and AGD's
minus CFG's (``real_model`` in the result). They are reported, not judged: no target rests on them.
A reference given as statistics (mu, sigma) is fixed: then only the samples are resampled, and the
intervals leave out the reference's own sampling error.

Only numpy and scipy: no torch, so a report can be checked anywhere.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from . import intervals

OUTCOMES = "outcomes.csv"
NEGATIVE_OUTCOMES = "negative_outcomes.csv"
FEATURES = "features.npz"
OUTCOME_COLUMNS = ("sample", "prompt", "label", "method", "w", "judged", "correct", "judged2", "correct2")
NEGATIVE_COLUMNS = ("sample", "negative_digit", "method", "judged", "shows_negative_digit")
REAL_OUTCOMES = "real_outcomes.csv"
REAL_COLUMNS = ("sample", "prompt", "method", "w", "clip_score")  # clip_score empty without a CLIP model
INCEPTION_PREFIX = "inception/"  # features.npz keys of the Inception features (real checkpoints)
REFERENCE_MU, REFERENCE_SIGMA = "reference_mu", "reference_sigma"  # a statistics reference, under INCEPTION_PREFIX
METHODS = ("unguided", "cfg", "agd")

ACCURACY_TOLERANCE = {"class": 1.0, "text": 2.0}  # points of accuracy AGD may lose against CFG
GUIDANCE_RECOVERED_MIN = 0.9
FID_RATIO_RANGE = (0.9, 1.1)
FIDELITY_RATIO_MAX = 0.25
SPEED_RATIO_MIN = 1.8
NEGATIVE_AVOIDANCE_MIN = 0.8
# AGD more than 15 % faster than the unguided model (a speed-up more than 15 % above the ceiling measured
# in the same run, CFG's time over the unguided model's) is noise
CEILING_SLACK = 1.15


class EvidenceError(ValueError):
    pass


# ------------------------------------------------------------------------------------- files


def feature_key(method: str, w: float | None) -> str:
    return method if w is None else f"{method}_w{w:g}"


def write_outcomes(path: Path, rows: list[dict], columns=OUTCOME_COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(value) -> str:
    return "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def read_outcomes(path: Path, columns=OUTCOME_COLUMNS) -> list[dict]:
    """Rows of an outcomes file, refused with the file and line when a row is not one of ours."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise EvidenceError(f"cannot read {path} ({err.strerror})") from None
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != tuple(columns):
        raise EvidenceError(f"{path}: header {reader.fieldnames} is not {list(columns)}")
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            parsed = {"sample": int(row["sample"]), "method": row["method"]}
            if columns == REAL_COLUMNS:
                parsed.update(prompt=int(row["prompt"]), w=float(row["w"]) if row["w"] else None,
                              clip_score=float(row["clip_score"]) if row["clip_score"] else None)
                if parsed["method"] not in METHODS or (parsed["w"] is None) != (parsed["method"] == "unguided") \
                        or not np.isfinite(parsed["clip_score"] if parsed["clip_score"] is not None else 0):
                    raise ValueError
                rows.append(parsed)
                continue
            parsed["judged"] = int(row["judged"])
            if columns == OUTCOME_COLUMNS:
                parsed.update(prompt=int(row["prompt"]), label=int(row["label"]),
                              w=float(row["w"]) if row["w"] else None, correct=int(row["correct"]),
                              judged2=int(row["judged2"]) if row["judged2"] else None,
                              correct2=int(row["correct2"]) if row["correct2"] else None)
                if parsed["method"] not in METHODS or parsed["correct"] not in (0, 1, None) \
                        or parsed["correct2"] not in (0, 1, None):
                    raise ValueError
            else:
                parsed.update(negative_digit=int(row["negative_digit"]),
                              shows_negative_digit=int(row["shows_negative_digit"]))
        except (TypeError, ValueError):
            raise EvidenceError(f"{path}, line {line}: not an outcome row ({row}); restore the file with "
                                "`git checkout` or re-run the evaluate stage") from None
        rows.append(parsed)
    return rows


# ------------------------------------------------------------------------------ the assessment


class Outcomes:
    """Per-sample results as arrays in sample order: ``correct[(method, w)]`` under the first judge
    (unguided under w None), ``correct2`` under the second judge (empty without one), ``agree``
    whether the two judges saw the same class, and the prompt (cluster) of each sample."""

    def __init__(self, rows: list[dict]):
        samples = sorted({r["sample"] for r in rows})
        if samples != list(range(len(samples))):
            raise EvidenceError("outcomes: sample ids must run 0 .. N-1")
        self.samples = len(samples)
        self.prompts = np.zeros(self.samples, dtype=np.int64)
        second = all(r.get("correct2") is not None for r in rows)
        self.correct: dict[tuple[str, float | None], np.ndarray] = {}
        self.correct2: dict[tuple[str, float | None], np.ndarray] = {}
        self.agree: dict[tuple[str, float | None], np.ndarray] = {}
        for r in rows:
            key = (r["method"], r["w"])
            for table, value in ((self.correct, r["correct"]),
                                 *(((self.correct2, r["correct2"]), (self.agree, int(r["judged"] == r["judged2"])))
                                   if second else ())):
                table.setdefault(key, np.full(self.samples, -1, dtype=np.int64))[r["sample"]] = value
            self.prompts[r["sample"]] = r["prompt"]
        for key, values in self.correct.items():
            if (values < 0).any():
                raise EvidenceError(f"outcomes: {key[0]} at w = {key[1]} lacks {int((values < 0).sum())} samples")
        if ("unguided", None) not in self.correct:
            raise EvidenceError("outcomes: no unguided rows")

    def ws(self) -> list[float]:
        return sorted({w for (_, w) in self.correct if w is not None})


class RealOutcomes:
    """The real-model per-sample file as arrays in sample order: the prompt (cluster) of each sample,
    the sample sets (method, w) there are, and ``clip[(method, w)]`` the CLIP score of each sample
    (empty without a CLIP model)."""

    def __init__(self, rows: list[dict]):
        samples = sorted({r["sample"] for r in rows})
        if samples != list(range(len(samples))):
            raise EvidenceError("real outcomes: sample ids must run 0 .. N-1")
        scored = {r["clip_score"] is not None for r in rows}
        if len(scored) > 1:
            raise EvidenceError("real outcomes: clip_score is given for some rows only")
        self.samples = len(samples)
        self.prompts = np.zeros(self.samples, dtype=np.int64)
        seen: dict[tuple[str, float | None], np.ndarray] = {}
        self.clip: dict[tuple[str, float | None], np.ndarray] = {}
        for r in rows:
            key = (r["method"], r["w"])
            seen.setdefault(key, np.zeros(self.samples, dtype=bool))[r["sample"]] = True
            if True in scored:
                self.clip.setdefault(key, np.full(self.samples, np.nan))[r["sample"]] = r["clip_score"]
            self.prompts[r["sample"]] = r["prompt"]
        for key, present in seen.items():
            if not present.all():
                raise EvidenceError(f"real outcomes: {key[0]} at w = {key[1]} lacks {int((~present).sum())} samples")
        if ("unguided", None) not in seen:
            raise EvidenceError("real outcomes: no unguided rows")
        self.sets = list(seen)

    def ws(self) -> list[float]:
        return sorted({w for (_, w) in self.sets if w is not None})


SECOND_JUDGE_PREFIX = "judge2_"  # features.npz keys of the second judge's feature space


def assess(rows: list[dict], features: dict[str, np.ndarray], in_range: list[float], tolerance: float,
           replicates: int = intervals.REPLICATES, seed: int = 0, real_rows: list[dict] | None = None) -> dict:
    """Per-w intervals and the in-range summary with the targets (speed and the negative check
    excluded: :func:`speed_summary`, :func:`negative_summary`), under the first judge; where the
    outcomes carry a second judge, the same numbers under it (reported beside the targets, which
    the first judge decides) and the two judges' agreement. ``features`` may be empty (no FID).

    ``real_rows`` (a real checkpoint's ``real_outcomes.csv``) add ``real_model``
    (:func:`real_model_assessment`) from the same draw of prompts; without a judge (``rows`` empty)
    the result holds only that and the bootstrap's settings."""
    real = RealOutcomes(real_rows) if real_rows else None
    if real is not None and not rows:
        weights = intervals.bootstrap_weights(real.prompts, replicates, seed)
        return {"real_model": real_model_assessment(real, features, weights, replicates, seed),
                "bootstrap": _bootstrap(real.prompts, replicates, seed)}
    outcomes = Outcomes(rows)
    ws = outcomes.ws()
    if not set(in_range) <= set(ws):
        raise EvidenceError(f"outcomes: in-range w {sorted(set(in_range) - set(ws))} missing")
    weights = intervals.bootstrap_weights(outcomes.prompts, replicates, seed)
    first = {k: v for k, v in features.items() if not k.startswith((SECOND_JUDGE_PREFIX, INCEPTION_PREFIX))}
    result = _judge_assessment(outcomes.correct, outcomes.samples, first, ws, in_range, tolerance, weights,
                               replicates, seed)
    if outcomes.correct2:
        second = {k[len(SECOND_JUDGE_PREFIX):]: v for k, v in features.items() if k.startswith(SECOND_JUDGE_PREFIX)}
        result["second_judge"] = _judge_assessment(outcomes.correct2, outcomes.samples, second, ws, in_range,
                                                   tolerance, weights, replicates, seed)
        # how often the two judges see the same class, per method and w
        result["second_judge"]["agreement"] = {
            feature_key(method, w): intervals.estimate(values.mean(), intervals.weighted_mean(values, weights))
            for (method, w), values in outcomes.agree.items()}
    if real is not None:
        if real.samples != outcomes.samples or (real.prompts != outcomes.prompts).any():
            raise EvidenceError("real outcomes: their samples and prompts are not those of the outcomes")
        result["real_model"] = real_model_assessment(real, features, weights, replicates, seed)
    result["bootstrap"] = _bootstrap(outcomes.prompts, replicates, seed)
    return result


def _bootstrap(prompts: np.ndarray, replicates: int, seed: int) -> dict:
    return {"confidence": intervals.CONFIDENCE, "replicates": replicates, "seed": seed,
            "clusters": "prompt" if len(set(prompts.tolist())) < len(prompts) else "sample", "samples": len(prompts)}


def real_model_assessment(real: RealOutcomes, features: dict[str, np.ndarray], weights: np.ndarray, replicates: int,
                          seed: int) -> dict:
    """Per w, the Inception FID of each method against the reference (bias-corrected like the
    judge's FIDs), FID_AGD / FID_CFG, the CLIP score of each method and AGD's minus CFG's, under the
    bootstrap ``weights`` of the other statistics. Reported, not judged: no target rests on them.

    The reference is ``inception/real`` (features of a folder of images, resampled on their own
    like the judge's real digits) or ``inception/reference_mu`` and ``..._sigma`` (statistics:
    fixed, so only the samples are resampled and the reference's own sampling error is left out)."""
    ws = real.ws()
    per_w: dict[str, dict] = {f"w{w:g}": {} for w in ws}
    result: dict = {}
    inception = {k[len(INCEPTION_PREFIX):]: v for k, v in features.items() if k.startswith(INCEPTION_PREFIX)}
    if inception:
        fids, result["fid_reference"] = _inception_replicates(inception, real, weights, replicates, seed)
        for w in ws:
            (cfg_point, cfg_reps), (agd_point, agd_reps) = fids[("cfg", w)], fids[("agd", w)]
            per_w[f"w{w:g}"].update({
                "inception_fid_unguided": _fid_estimate(*fids[("unguided", None)]),
                "inception_fid_cfg": _fid_estimate(cfg_point, cfg_reps),
                "inception_fid_agd": _fid_estimate(agd_point, agd_reps),
                "inception_fid_ratio_agd_over_cfg": _fid_estimate(agd_point / cfg_point, agd_reps / cfg_reps)})
    if real.clip:
        scores = {key: (values.mean(), intervals.weighted_mean(values, weights)) for key, values in real.clip.items()}
        ung_point, ung_reps = scores[("unguided", None)]
        for w in ws:
            (cfg_point, cfg_reps), (agd_point, agd_reps) = scores[("cfg", w)], scores[("agd", w)]
            per_w[f"w{w:g}"].update({
                "clip_score_unguided": intervals.estimate(ung_point, ung_reps),
                "clip_score_cfg": intervals.estimate(cfg_point, cfg_reps),
                "clip_score_agd": intervals.estimate(agd_point, agd_reps),
                "clip_score_difference_agd_minus_cfg": intervals.estimate(agd_point - cfg_point, agd_reps - cfg_reps)})
    return {**result, "per_w": per_w}


def _inception_replicates(features: dict[str, np.ndarray], real: RealOutcomes, weights: np.ndarray, replicates: int,
                          seed: int) -> tuple[dict, dict]:
    """(FID of each sample set against the reference: (point, replicates) by (method, w), a
    description of the reference). Computed by :func:`intervals.sample_frechet_distance`: Inception
    features have more dimensions than a run has samples."""
    missing = [feature_key(*key) for key in real.sets if feature_key(*key) not in features]
    if missing:
        raise EvidenceError(f"features: no Inception features of {', '.join(missing)}")
    # one call per set: the first row of weights is the set itself (the point), the others the replicates
    if "real" in features:
        size = len(features["real"])
        reference = {"features_b": features["real"],
                     "weights_b": np.vstack([np.ones((1, size)), _reference_weights(size, replicates, seed)])}
        about = {"kind": "images", "images": size, "resampled": True}
    elif REFERENCE_MU in features and REFERENCE_SIGMA in features:
        reference = {"mean_b": features[REFERENCE_MU], "cov_b": features[REFERENCE_SIGMA]}
        about = {"kind": "statistics", "resampled": False}
    else:
        raise EvidenceError("features: no Inception reference (inception/real or inception/reference_mu and _sigma)")
    fids = {}
    for method, w in real.sets:
        values = features[feature_key(method, w)]
        both = intervals.sample_frechet_distance(values, np.vstack([np.ones((1, len(values))), weights]), **reference)
        fids[(method, w)] = (float(both[0]), both[1:])
    return fids, about


def _reference_weights(size: int, replicates: int, seed: int) -> np.ndarray:
    """The real reference set's own draw (it is not paired with the samples)."""
    return intervals.bootstrap_weights(np.arange(size), replicates, seed + 1)


def _judge_assessment(correct: dict, samples: int, features: dict, ws: list[float], in_range: list[float],
                      tolerance: float, weights: np.ndarray, replicates: int, seed: int) -> dict:
    """One judge's per-w rows and in-range summary with the targets."""
    acc = {key: (values.mean(), intervals.weighted_mean(values, weights)) for key, values in correct.items()}
    fids = _fid_replicates(features, ws, weights, replicates, seed) if features else None
    per_w, drops, gains_cfg, gains_agd = {}, {}, [], []
    ung_point, ung_reps = acc[("unguided", None)]
    for w in ws:
        (cfg_point, cfg_reps), (agd_point, agd_reps) = acc[("cfg", w)], acc[("agd", w)]
        cfg_only = int(((correct[("cfg", w)] == 1) & (correct[("agd", w)] == 0)).sum())
        agd_only = int(((correct[("cfg", w)] == 0) & (correct[("agd", w)] == 1)).sum())
        drops[w] = 100 * (cfg_reps - agd_reps)
        mc_low, mc_high = intervals.mcnemar_interval(cfg_only, agd_only, samples)
        row = {"accuracy_unguided": intervals.estimate(ung_point, ung_reps),
               "accuracy_cfg": intervals.estimate(cfg_point, cfg_reps),
               "accuracy_agd": intervals.estimate(agd_point, agd_reps),
               "accuracy_drop_points": intervals.estimate(100 * (cfg_point - agd_point), drops[w]),
               "mcnemar": {"cfg_only": cfg_only, "agd_only": agd_only,
                           "p_value": intervals.mcnemar_exact(cfg_only, agd_only),
                           "drop_points_low": 100 * mc_low, "drop_points_high": 100 * mc_high},
               "guidance_recovered": _ratio_estimate(agd_point - ung_point, cfg_point - ung_point,
                                                     agd_reps - ung_reps, cfg_reps - ung_reps)}
        if fids is not None:
            row.update(_fid_row(fids, w))
        per_w[f"w{w:g}"] = row
        if w in in_range:
            gains_cfg.append((cfg_point - ung_point, cfg_reps - ung_reps))
            gains_agd.append((agd_point - ung_point, agd_reps - ung_reps))
    summary = {"max_accuracy_drop_points": _max_estimate({w: (100 * (acc[("cfg", w)][0] - acc[("agd", w)][0]), drops[w])
                                                          for w in in_range}),
               "guidance_recovered": _ratio_estimate(sum(g[0] for g in gains_agd), sum(g[0] for g in gains_cfg),
                                                     sum(g[1] for g in gains_agd), sum(g[1] for g in gains_cfg))}
    if fids is not None:
        summary["max_fidelity_ratio"] = _max_estimate({w: (per_w[f"w{w:g}"]["fidelity_ratio"]["point"],
                                                           debiased(per_w[f"w{w:g}"]["fidelity_ratio"]["point"],
                                                                    fids["fidelity"][w])) for w in in_range})
        ratios = [per_w[f"w{w:g}"]["fid_ratio_agd_over_cfg"] for w in in_range]
        summary["fid_ratio_agd_over_cfg"] = {"min_point": min(r["point"] for r in ratios),
                                             "max_point": max(r["point"] for r in ratios),
                                             "low": min(r["low"] for r in ratios),
                                             "high": max(r["high"] for r in ratios)}
    summary["targets"] = quality_targets(summary, tolerance)
    return {"per_w": per_w, "summary": summary}


def quality_targets(summary: dict, tolerance: float) -> dict:
    """Each target with the bound it is judged on and whether that bound meets it."""
    targets = {}
    drop = summary["max_accuracy_drop_points"]
    targets["accuracy_drop"] = {"limit": f"upper bound <= {tolerance:g} point{'' if tolerance == 1 else 's'}",
                                "bound": drop["high"],
                                "met": bool(drop["high"] <= tolerance)}
    recovered = summary["guidance_recovered"]
    targets["guidance_recovered"] = {"limit": f"lower bound >= {GUIDANCE_RECOVERED_MIN:g}", "bound": recovered["low"],
                                     # undefined where CFG gains nothing over the unguided model: not met
                                     "met": recovered["low"] is not None and recovered["low"] >= GUIDANCE_RECOVERED_MIN}
    if "fid_ratio_agd_over_cfg" in summary:
        ratio = summary["fid_ratio_agd_over_cfg"]
        low, high = FID_RATIO_RANGE
        targets["fid_ratio"] = {"limit": f"both bounds in [{low:g}, {high:g}] at every in-range w",
                                "bound": [ratio["low"], ratio["high"]],
                                "met": bool(ratio["low"] >= low and ratio["high"] <= high)}
        fidelity = summary["max_fidelity_ratio"]
        targets["fidelity"] = {"limit": f"upper bound <= {FIDELITY_RATIO_MAX:g}", "bound": fidelity["high"],
                               "met": bool(fidelity["high"] <= FIDELITY_RATIO_MAX)}
    return targets


def _ratio_estimate(num_point, den_point, num_reps, den_reps) -> dict:
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = np.where(den_reps != 0, num_reps / np.where(den_reps != 0, den_reps, 1), np.nan)
    point = num_point / den_point if den_point != 0 else float("nan")
    finite = reps[np.isfinite(reps)]
    if not np.isfinite(point) or len(finite) < 0.9 * len(reps):
        # CFG gains (almost) nothing over the unguided model here: no share to recover
        return {"point": None, "low": None, "high": None}
    return intervals.estimate(point, finite)


def _max_estimate(per_w: dict[float, tuple[float, np.ndarray]]) -> dict:
    """The worst case over w, its interval from the replicates' own worst case (the same draw of
    samples for every w), and the w where it sits."""
    worst = max(per_w, key=lambda w: per_w[w][0])
    reps = np.max(np.stack([reps for _, reps in per_w.values()]), axis=0)
    return {**intervals.estimate(per_w[worst][0], reps), "w": worst}


def _fid_replicates(features: dict[str, np.ndarray], ws: list[float], weights: np.ndarray, replicates: int,
                    seed: int) -> dict:
    """FID of each sample set against the real set, and AGD's and the unguided model's against CFG's,
    per replicate; the real set is resampled on its own (it is not paired with the samples)."""
    if "real" not in features:
        raise EvidenceError("features: no 'real' set")
    real_weights = _reference_weights(len(features["real"]), replicates, seed)
    cache: dict[str, tuple] = {}

    def moments(key: str) -> tuple:
        """(per-replicate moments, the set's own moments) of a feature set, computed once."""
        if key not in cache:
            values = features[key]
            drawn = real_weights if key == "real" else weights  # the samples share one draw; real its own
            cache[key] = (intervals.weighted_moments(values, drawn),
                          intervals.weighted_moments(values, np.ones((1, len(values)))))
        return cache[key]

    def fid_pair(a_key: str, b_key: str) -> tuple[float, np.ndarray]:
        (a_reps, a_point), (b_reps, b_point) = moments(a_key), moments(b_key)
        return (float(intervals.frechet_distance(*a_point, *b_point)[0]),
                intervals.frechet_distance(*a_reps, *b_reps))

    out = {"real": {None: fid_pair("unguided", "real")}, "to_cfg": {}, "fidelity": {}}
    for w in ws:
        cfg, agd = feature_key("cfg", w), feature_key("agd", w)
        out["real"][("cfg", w)] = fid_pair(cfg, "real")
        out["real"][("agd", w)] = fid_pair(agd, "real")
        out["to_cfg"][("agd", w)] = fid_pair(agd, cfg)
        out["to_cfg"][("unguided", w)] = fid_pair("unguided", cfg)
        out["fidelity"][w] = out["to_cfg"][("agd", w)][1] / out["to_cfg"][("unguided", w)][1]
    return out


def _fid_row(fids: dict, w: float) -> dict:
    (cfg_point, cfg_reps), (agd_point, agd_reps) = fids["real"][("cfg", w)], fids["real"][("agd", w)]
    (to_agd, _), (to_ung, _) = fids["to_cfg"][("agd", w)], fids["to_cfg"][("unguided", w)]
    return {"fid_unguided": _fid_estimate(*fids["real"][None]),
            "fid_cfg": _fid_estimate(cfg_point, cfg_reps), "fid_agd": _fid_estimate(agd_point, agd_reps),
            "fid_ratio_agd_over_cfg": _fid_estimate(agd_point / cfg_point, agd_reps / cfg_reps),
            "fid_to_cfg_agd": _fid_estimate(*fids["to_cfg"][("agd", w)]),
            "fid_to_cfg_unguided": _fid_estimate(*fids["to_cfg"][("unguided", w)]),
            "fidelity_ratio": _fid_estimate(to_agd / to_ung, fids["fidelity"][w])}


def debiased(point: float, replicates: np.ndarray) -> np.ndarray:
    """FID replicates moved by the bootstrap's estimate of its own bias (their mean minus the point).
    A resample repeats some samples and drops others, which moves each set's mean by about
    tr(cov) / n and so adds that much to every FID replicate: on 360 reference digits as much as the
    smallest FIDs themselves, so the plain percentile interval can miss its own point estimate.
    The shifted replicates give a bias-corrected percentile interval."""
    return replicates - (replicates.mean() - point)


def _fid_estimate(point: float, replicates: np.ndarray) -> dict:
    return intervals.estimate(point, np.clip(debiased(point, replicates), 0, None))


# ------------------------------------------------------------------------------ speed, negatives


def speed_summary(timings: dict[str, dict[str, list[float]]], nfe: dict[str, int], images: dict[str, int],
                  evaluation_batch: str) -> dict:
    """Images per second per batch size and method (median, min, max over the repeats), the paired
    AGD / CFG and AGD / unguided time ratios per repeat, and two ceilings for AGD / CFG.

    The evaluation-count ceiling, CFG's network evaluations per image over AGD's, assumes an
    evaluation costs the same in both. It need not: CFG evaluates a doubled batch, which on a CPU
    can cost more than twice one (2.5-2.9x at batch 500 on the class default), or less (1.1-1.4x at
    batch 1). The measured ceiling, CFG's time over the unguided model's in the same repeats, is what
    adapters that cost nothing would reach, whatever the batch does. AGD makes the unguided model's
    evaluations plus the adapters', so a median AGD / CFG ratio more than 15 % above the measured
    ceiling (AGD faster than the unguided model) is noise, not a result: that batch's row is marked
    and the speed target fails. A CFG pass slowed by load raises both the ratio and the measured
    ceiling; the interleaved repeats and their spread are what show that.

    ``timings[batch][method]``: seconds per repeat (the methods timed in turn within a repeat);
    ``images[batch]``: images per timed call."""
    ceiling = nfe["cfg"] / nfe["agd"]
    rows = {}
    for batch, by_method in timings.items():
        seconds = {m: np.asarray(by_method[m], dtype=np.float64) for m in METHODS}
        speedup = seconds["cfg"] / seconds["agd"]
        cost = seconds["agd"] / seconds["unguided"]
        free = seconds["cfg"] / seconds["unguided"]  # what adapters that cost nothing would reach here
        rows[batch] = {
            "images": images[batch], "repeats": len(speedup), "seconds": {m: by_method[m] for m in METHODS},
            **{f"images_per_second_{m}": _spread(images[batch] / seconds[m]) for m in METHODS},
            "speed_ratio_agd_over_cfg": _spread(speedup), "time_ratio_agd_over_unguided": _spread(cost),
            "time_ratio_cfg_over_unguided": _spread(free),
            "above_count_ceiling": bool(np.median(speedup) > ceiling),
            "above_ceiling": bool(np.median(speedup) > CEILING_SLACK * np.median(free))}
    main = rows[evaluation_batch]
    valid = not any(r["above_ceiling"] for r in rows.values())
    return {"nfe_per_image": nfe, "ceiling_agd_over_cfg": ceiling, "evaluation_batch": evaluation_batch,
            "measured_ceiling_agd_over_cfg": main["time_ratio_cfg_over_unguided"]["median"],
            "per_batch": rows,
            "target": {"limit": f"smallest AGD/CFG ratio over the repeats at the evaluation batch >= "
                                f"{SPEED_RATIO_MIN:g}, none above {CEILING_SLACK:g} x the measured ceiling "
                                "(CFG time / unguided time)",
                       "bound": main["speed_ratio_agd_over_cfg"]["min"],
                       "met": bool(valid and main["speed_ratio_agd_over_cfg"]["min"] >= SPEED_RATIO_MIN)}}


def _spread(values: np.ndarray) -> dict:
    return {"median": float(np.median(values)), "min": float(values.min()), "max": float(values.max())}


def negative_summary(rows: list[dict], replicates: int = intervals.REPLICATES, seed: int = 0) -> dict:
    """How often the digit a negative prompt names still appears, per method; avoidance = the
    unguided rate minus the method's; AGD's avoidance over CFG's with its interval (samples drawn
    alike for the three methods: they share seeds)."""
    samples = sorted({r["sample"] for r in rows})
    hits = {m: np.zeros(len(samples)) for m in METHODS}
    for r in rows:
        hits[r["method"]][r["sample"]] = r["shows_negative_digit"]
    weights = intervals.bootstrap_weights(np.arange(len(samples)), replicates, seed)
    rate = {m: (hits[m].mean(), intervals.weighted_mean(hits[m], weights)) for m in METHODS}
    ratio = _ratio_estimate(rate["unguided"][0] - rate["agd"][0], rate["unguided"][0] - rate["cfg"][0],
                            rate["unguided"][1] - rate["agd"][1], rate["unguided"][1] - rate["cfg"][1])
    met = ratio["low"] is not None and ratio["low"] >= NEGATIVE_AVOIDANCE_MIN
    return {"negative_digit_rate": {m: intervals.estimate(rate[m][0], rate[m][1]) for m in METHODS},
            "avoidance_ratio_agd_over_cfg": ratio,
            "target": {"limit": f"lower bound >= {NEGATIVE_AVOIDANCE_MIN:g}", "bound": ratio["low"], "met": bool(met)}}


def targets_met(summary: dict) -> bool:
    return all(t["met"] for t in summary["targets"].values())


# ------------------------------------------------------------------------------ from a folder


def assess_folder(folder: Path, metrics: dict) -> dict:
    """Recompute the evidence of an evaluate run from its per-sample files and recorded timings, with
    the settings its metrics.json records (what `stages.report --check` compares with the stored
    numbers): ``{"evidence": ..., "speed": ...}``."""
    folder = Path(folder)
    boot = metrics["evidence"]["bootstrap"]
    real_rows = read_outcomes(folder / REAL_OUTCOMES, REAL_COLUMNS) if (folder / REAL_OUTCOMES).is_file() else None
    # a real checkpoint without a judge has real outcomes only
    rows = read_outcomes(folder / OUTCOMES) if real_rows is None or (folder / OUTCOMES).is_file() else []
    features = {}
    if (folder / FEATURES).is_file():
        with np.load(folder / FEATURES) as data:
            features = {k: data[k] for k in data.files}
    in_range = [r["w"] for r in metrics["per_w"].values() if r["in_training_range"]]
    tolerance = metrics["evidence"].get("accuracy_tolerance")  # none without a judge
    result = assess(rows, features, in_range, tolerance, boot["replicates"], boot["seed"], real_rows)
    if (folder / NEGATIVE_OUTCOMES).is_file():
        result["negative"] = negative_summary(read_outcomes(folder / NEGATIVE_OUTCOMES, NEGATIVE_COLUMNS),
                                              boot["replicates"], boot["seed"])
    speed = metrics["speed"]
    recomputed_speed = speed_summary({b: r["seconds"] for b, r in speed["per_batch"].items()}, speed["nfe_per_image"],
                                     {b: r["images"] for b, r in speed["per_batch"].items()}, speed["evaluation_batch"])
    return {"evidence": {**result, **({"accuracy_tolerance": tolerance} if tolerance is not None else {})},
            "speed": recomputed_speed}


def differences(stored, recomputed, path: str = "", rel: float = 1e-6) -> list[str]:
    """Where two JSON-like trees differ (numbers within ``rel``), as 'path: stored != recomputed'."""
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = [f"{path}/{k}: missing on one side" for k in sorted(set(stored) ^ set(recomputed), key=str)]
        for key in stored.keys() & recomputed.keys():
            out += differences(stored[key], recomputed[key], f"{path}/{key}", rel)
        return out
    if isinstance(stored, (list, tuple)) and isinstance(recomputed, (list, tuple)) and len(stored) == len(recomputed):
        return [d for i, (a, b) in enumerate(zip(stored, recomputed)) for d in differences(a, b, f"{path}[{i}]", rel)]
    numbers = (int, float)
    if isinstance(stored, numbers) and isinstance(recomputed, numbers) and not isinstance(stored, bool):
        return [] if np.isclose(stored, recomputed, rtol=rel, atol=1e-12) else [f"{path}: {stored} != {recomputed}"]
    return [] if stored == recomputed else [f"{path}: {stored!r} != {recomputed!r}"]
