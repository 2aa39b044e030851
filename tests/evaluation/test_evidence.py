"""The evaluation's evidence: targets judged on bounds, the speed guard, the split bookkeeping, and
`stages.report --check` recomputing every interval from the per-sample files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agd_pipeline import evidence
from agd_pipeline.evaluation import evaluation_seeds, GAP_CLOSED_SEED
from experiments import EXPERIMENTS, Experiment, Variant, run_commands
from agd_pipeline.errors import ConfigError
from agd_pipeline.sampling import trajectory_seed

ROOT = Path(__file__).resolve().parents[2]
WS = [1.5, 3.0, 8.0]
IN_RANGE = [1.5, 3.0]


def _synthetic(n=400, seed=0, agd_like="cfg"):
    """Outcomes and features of a run where the unguided model is 70 % right and CFG 95 %; AGD copies
    CFG's outcomes and features (a perfect distillation) or the unguided model's."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    unguided = (rng.random(n) < 0.7).astype(int)
    rows, features = [], {"real": rng.normal(size=(300, 8))}
    features["unguided"] = rng.normal(size=(n, 8))

    def add(method, w, correct):
        # a second judge that sees the same class nine times in ten
        for i, c in enumerate(correct):
            judged = int(labels[i] if c else (labels[i] + 1) % 10)
            judged2 = judged if rng.random() < 0.9 else (judged + 3) % 10
            rows.append({"sample": i, "prompt": i, "label": int(labels[i]), "method": method, "w": w,
                         "judged": judged, "correct": int(c), "judged2": judged2,
                         "correct2": int(judged2 == labels[i])})

    add("unguided", None, unguided)
    for w in WS:
        cfg = np.where(rng.random(n) < 0.95, 1, unguided)
        cfg_features = rng.normal(size=(n, 8)) * (1 + 0.3 * w) + 0.5 * w  # CFG drifts from the data with w
        add("cfg", w, cfg)
        features[f"cfg_w{w:g}"] = cfg_features
        if agd_like == "cfg":
            add("agd", w, cfg)
            features[f"agd_w{w:g}"] = cfg_features + rng.normal(size=cfg_features.shape) * 0.05
        else:
            add("agd", w, unguided)
            features[f"agd_w{w:g}"] = features["unguided"]
    features.update({f"judge2_{k}": v[:, :4] for k, v in list(features.items())})
    return rows, features


def test_a_faithful_student_meets_the_quality_targets_and_the_unguided_model_fails_each():
    rows, features = _synthetic()
    good = evidence.assess(rows, features, IN_RANGE, tolerance=1.0, replicates=300)
    assert all(t["met"] for t in good["summary"]["targets"].values()), good["summary"]["targets"]
    # the second judge: its own accuracies, FIDs in its own features, and how often it agrees
    second = good["second_judge"]
    assert set(second["per_w"]) == set(good["per_w"]) and "max_fidelity_ratio" in second["summary"]
    assert second["agreement"]["cfg_w1.5"]["point"] == pytest.approx(0.9, abs=0.05)
    assert second["agreement"]["cfg_w1.5"]["low"] < 0.9 < second["agreement"]["cfg_w1.5"]["high"] + 0.03
    rows, features = _synthetic(agd_like="unguided")
    bad = evidence.assess(rows, features, IN_RANGE, tolerance=1.0, replicates=300)
    targets = bad["summary"]["targets"]
    assert set(targets) == {"accuracy_drop", "guidance_recovered", "fid_ratio", "fidelity"}
    assert not any(t["met"] for t in targets.values()), targets
    assert bad["summary"]["guidance_recovered"]["point"] == pytest.approx(0.0)
    assert bad["summary"]["max_fidelity_ratio"]["point"] == pytest.approx(1.0)


def test_a_target_met_on_its_point_but_not_its_bound_fails():
    # AGD loses 3 of 400 samples against CFG at one w: 0.75 points, under the 1-point tolerance,
    # but the upper bound of the drop lies above it
    rows, features = _synthetic()
    lost = 0
    for r in rows:
        if r["method"] == "agd" and r["w"] == 1.5 and r["correct"] == 1 and lost < 3:
            r["correct"], lost = 0, lost + 1
    result = evidence.assess(rows, features, IN_RANGE, tolerance=1.0, replicates=500)
    drop = result["summary"]["max_accuracy_drop_points"]
    assert drop["point"] == pytest.approx(0.75) and drop["w"] == 1.5
    assert drop["high"] > 1.0
    assert not result["summary"]["targets"]["accuracy_drop"]["met"]
    assert result["per_w"]["w1.5"]["mcnemar"] == {**result["per_w"]["w1.5"]["mcnemar"], "cfg_only": 3, "agd_only": 0}


def test_the_worst_case_interval_covers_every_w_at_once():
    rows, features = _synthetic()
    result = evidence.assess(rows, features, IN_RANGE, tolerance=1.0, replicates=300)
    worst = result["summary"]["max_accuracy_drop_points"]
    for w in IN_RANGE:
        assert worst["high"] >= result["per_w"][f"w{w:g}"]["accuracy_drop_points"]["high"] - 1e-12


def test_outcomes_files_round_trip_and_damaged_rows_are_named(tmp_path):
    rows, _ = _synthetic(n=20)
    path = tmp_path / evidence.OUTCOMES
    evidence.write_outcomes(path, rows)
    assert evidence.read_outcomes(path) == rows
    text = path.read_text().splitlines()
    text[5] = text[5].replace(",1\n", ",7").rsplit(",", 1)[0] + ",yes"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(evidence.EvidenceError, match=r"line 6"):
        evidence.read_outcomes(path)


def _timings(cfg_seconds, agd_seconds, unguided_seconds):
    return {"cfg": cfg_seconds, "agd": agd_seconds, "unguided": unguided_seconds}


def test_speed_above_the_measured_ceiling_is_noise_not_a_result():
    """The guard: AGD makes the unguided model's evaluations plus the adapters', so AGD / CFG can reach
    CFG time / unguided time (what free adapters would), not more; the evaluation count (2x here) is
    reported beside it but does not bound seconds (a doubled batch can cost more than twice one)."""
    nfe = {"cfg": 64, "agd": 32}
    honest = evidence.speed_summary({"500": _timings([2.0] * 5, [1.05] * 5, [1.0] * 5)}, nfe, {"500": 500}, "500")
    assert honest["ceiling_agd_over_cfg"] == 2.0 and honest["measured_ceiling_agd_over_cfg"] == 2.0
    assert not honest["per_batch"]["500"]["above_ceiling"] and honest["target"]["met"]
    # CFG's doubled batch costing 2.6x the unguided call: AGD at the unguided model's time is 2.6x CFG,
    # above the evaluation count but a result (the class default measures this at batch 500)
    superlinear = evidence.speed_summary({"500": _timings([2.6] * 5, [1.05] * 5, [1.0] * 5)}, nfe, {"500": 500},
                                         "500")
    row = superlinear["per_batch"]["500"]
    assert row["above_count_ceiling"] and not row["above_ceiling"] and superlinear["target"]["met"]
    assert superlinear["measured_ceiling_agd_over_cfg"] == pytest.approx(2.6)
    # AGD 25 % faster than the unguided model in the same repeats: noise; the row is marked and the target fails
    noisy = evidence.speed_summary({"500": _timings([2.0] * 5, [0.8] * 5, [1.0] * 5), "1": _timings([2] * 5, [1] * 5,
                                                                                                   [1] * 5)},
                                   nfe, {"500": 500, "1": 1}, "500")
    assert noisy["per_batch"]["500"]["above_ceiling"] and not noisy["target"]["met"]
    assert not noisy["per_batch"]["1"]["above_ceiling"]
    # within 15 % of the unguided model's time is not marked (timing jitter between the interleaved calls)
    close = evidence.speed_summary({"500": _timings([2.0] * 5, [0.9] * 5, [1.0] * 5)}, nfe, {"500": 500}, "500")
    assert not close["per_batch"]["500"]["above_ceiling"]
    # judged on the slowest repeat, not the median
    slow_once = evidence.speed_summary({"500": _timings([2.0, 2.0, 2.0, 2.0, 1.5], [1.0] * 5, [1.0] * 5)}, nfe,
                                       {"500": 500}, "500")
    assert slow_once["per_batch"]["500"]["speed_ratio_agd_over_cfg"]["median"] == 2.0
    assert not slow_once["target"]["met"]
    # a guidance interval: 40 CFG evaluations against 32 (1.25x in evaluations); the measured ceiling
    # follows from CFG's own time, and AGD faster than the unguided model is still caught
    interval = evidence.speed_summary({"500": _timings([1.3] * 5, [0.8] * 5, [1.0] * 5)}, {"cfg": 40, "agd": 32},
                                      {"500": 500}, "500")
    assert interval["ceiling_agd_over_cfg"] == 1.25 and interval["per_batch"]["500"]["above_ceiling"]


def test_cfg_counts_its_evaluations_inside_a_guidance_interval(tiny_base_dir):
    import torch

    from agd_pipeline.models import load_base_model
    from agd_pipeline.sampling import CFG, generators_for, initial_noise, sample

    base = load_base_model(str(tiny_base_dir))
    cond = base.class_condition(torch.tensor([1, 2]))
    gens = generators_for([1, 2])
    full, interval = CFG(base, 3.0), CFG(base, 3.0, interval=(0.0, 0.5))
    for denoiser in (full, interval):
        sample(base, cond, initial_noise(base, generators_for([1, 2])), 8, denoiser, generators=gens)
    assert full.evaluations == 16
    assert 8 < interval.evaluations < 16


# ------------------------------------------------------------------------- split bookkeeping


def test_test_seeds_share_nothing_with_validation_store_or_gap_closed_seeds():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    n = params["evaluate"]["samples_per_class"] * 10
    test = evaluation_seeds("test", params["evaluate"]["seed"], n)
    validation = evaluation_seeds("validation", params["evaluate"]["seed"], n)
    assert validation == [trajectory_seed(params["evaluate"]["seed"], i) for i in range(n)]  # what tuning used
    store = {trajectory_seed(params["generate"]["seed"], i) for i in range(params["generate"]["trajectories_per_class"]
                                                                             * 10)}
    gap = {trajectory_seed(GAP_CLOSED_SEED[s], i) for s in GAP_CLOSED_SEED for i in range(400)}
    assert len(set(test)) == n
    assert not set(test) & (set(validation) | store | gap)
    assert params["evaluate"]["split"] == "test"  # the default run reports on the test split
    with pytest.raises(ConfigError, match="split"):
        evaluation_seeds("train", 0, 3)


def test_experiments_decide_on_the_validation_split_only():
    for experiment in EXPERIMENTS.values():
        for command in run_commands(experiment):
            sets = [command[i + 1] for i, arg in enumerate(command) if arg == "-S"]
            if experiment.pipeline in ("dvc.yaml", "pipelines/text/dvc.yaml:evaluate@sd3"):
                assert any(s.endswith('evaluate.split="validation"') for s in sets), command
            else:  # the derivatives pipelines: their own params files hold the split
                import yaml

                folder = ROOT / Path(experiment.pipeline).parent
                for params_file in folder.glob("*.yaml"):
                    section = (yaml.safe_load(params_file.read_text()) or {}).get("evaluate")
                    if section is not None:
                        assert section["split"] == "validation", params_file
    sneaky = Experiment("sneaky", "t", "q", (Variant("a", "a", {"evaluate.split": "test"}),), (), ())
    with pytest.raises(ConfigError, match="validation split only"):
        sneaky.runs()


# ------------------------------------------------------------------------- report --check


def _evaluate_like_folder(tmp_path: Path) -> Path:
    """metrics.json and per-sample files as the evaluate stage writes them (synthetic numbers)."""
    folder = tmp_path / "eval"
    folder.mkdir()
    rows, features = _synthetic(n=60)
    evidence.write_outcomes(folder / evidence.OUTCOMES, rows)
    np.savez_compressed(folder / evidence.FEATURES, **{k: v.astype(np.float32) for k, v in features.items()})
    features = dict(np.load(folder / evidence.FEATURES))
    assessed = evidence.assess(rows, features, IN_RANGE, 1.0, replicates=200)
    speed = evidence.speed_summary({"60": _timings([2.0] * 5, [1.0] * 5, [0.95] * 5)}, {"cfg": 8, "agd": 4},
                                   {"60": 60}, "60")
    per_w = {f"w{w:g}": {"w": w, "in_training_range": w in IN_RANGE, "accuracy_cfg": 0.9, "accuracy_agd": 0.9,
                         "fid_cfg": 1.0, "fid_agd": 1.0, "fid_to_cfg_agd": 0.1, "fid_to_cfg_unguided": 1.0,
                         "fid_unguided": 1.0, "accuracy_unguided": 0.7, "rmse_to_cfg_agd": 0.1,
                         "images_per_second_cfg": 30.0, "images_per_second_agd": 60.0,
                         "speed_ratio_agd_over_cfg": 2.0, "nfe_per_image_cfg": 8, "nfe_per_image_agd": 4}
             for w in WS}
    metrics = {"num_steps": 4, "samples_per_w": 60, "split": "test", "training_range": [1.0, 6.0],
               "conditioning": "class", "per_w": per_w, "speed": speed,
               "summary_in_training_range": {"targets_met": False},
               "evidence": {**assessed, "accuracy_tolerance": 1.0}}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def _report(*args):
    from stages.report import main

    return main([str(a) for a in args])


def test_report_check_recomputes_every_interval_from_the_per_sample_files(tmp_path, capsys):
    folder = _evaluate_like_folder(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\n<!-- results:end -->\n")
    assert _report("--metrics", folder / "metrics.json", "--readme", readme) == 0
    text = readme.read_text()
    assert "95 % intervals" in text and "| target |" in text and "**test split**" in text
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 0
    # one outcome flipped in the tracked file: the stored intervals no longer follow from it
    outcomes = folder / evidence.OUTCOMES
    good = outcomes.read_text()
    lines = good.splitlines()
    row = next(i for i, line in enumerate(lines) if line.split(",")[3:7:3] == ["agd", "1"]
               and line.split(",")[4] == "1.5")
    cells = lines[row].split(",")
    cells[6] = "0"
    lines[row] = ",".join(cells)
    outcomes.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 1
    assert "recomputed from the per-sample files" in capsys.readouterr().err
    outcomes.write_text(good)
    # an interval edited by hand in metrics.json
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["evidence"]["summary"]["max_accuracy_drop_points"]["high"] = 0.5
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 1
    # the per-sample file missing altogether
    shutil.copy(folder / "metrics.json", tmp_path / "copy.json")
    outcomes.unlink()
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 1
    assert "cannot recompute" in capsys.readouterr().err


def test_fid_intervals_contain_their_point_where_resampling_bias_exceeds_the_fid():
    """A resample repeats samples, which adds about tr(cov) / n to every FID replicate: with a small
    reference set that is more than a small FID itself, and the plain percentile interval lies
    wholly above its point. The bias-corrected interval must contain it."""
    from agd_pipeline import intervals

    rng = np.random.default_rng(11)
    real = rng.normal(size=(300, 16))
    generated = rng.normal(size=(1000, 16)) * 1.05 + 0.1
    point = intervals.fid(generated, real)
    weights = intervals.bootstrap_weights(np.arange(1000), 400, seed=1)
    real_weights = intervals.bootstrap_weights(np.arange(300), 400, seed=2)
    raw = intervals.frechet_distance(*intervals.weighted_moments(generated, weights),
                                     *intervals.weighted_moments(real, real_weights))
    assert intervals.interval(raw)[0] > point  # the plain percentile interval misses its point
    fixed = evidence._fid_estimate(point, raw)
    assert fixed["low"] <= point <= fixed["high"] and fixed["low"] >= 0


@pytest.mark.bad_input
def test_a_text_base_without_test_prompts_is_refused_with_the_way_out(tmp_path):
    """A text base made before the test split has only prompts/eval.tsv: the test split says which
    file is missing and what to do, the validation split still evaluates."""
    from types import SimpleNamespace

    from agd_pipeline.config import EvaluateConfig
    from agd_pipeline.evaluation import evaluation_set

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "eval.tsv").write_text("3\ta three\n")
    base = SimpleNamespace(conditioning="text", model_id="old-text-base")
    with pytest.raises(ConfigError, match=r"test prompts .*test\.tsv is missing.*evaluate\.split to validation"):
        evaluation_set(EvaluateConfig(split="test"), base, str(tmp_path), {})
    # the validation split gets as far as encoding its prompts (which this stand-in base cannot do)
    with pytest.raises(AttributeError):
        evaluation_set(EvaluateConfig(split="validation"), base, str(tmp_path), {"negative_prompt": ""})


# ------------------------------------------------------------------ real checkpoints (Inception FID, CLIP score)


def _synthetic_real(n=120, per_prompt=4, seed=0, dim=6, agd_clip="cfg", reference="images", reference_size=200):
    """Real-model per-sample data: rows of real_outcomes.csv (CLIP scores) and Inception-like features
    of every sample set and of the reference (images, or their mu and sigma). CFG's features drift
    from the reference with w; AGD's are CFG's plus a little noise. AGD's CLIP scores: CFG's own
    ("cfg"), CFG's plus noise of mean 0 (the same CLIP score, other samples: "same"), or 5 points
    lower ("lower")."""
    rng = np.random.default_rng(seed)
    prompts = np.arange(n) // per_prompt
    prompt_effect = rng.normal(size=prompts.max() + 1)[prompts] * 3  # samples of a prompt score alike
    reference_images = rng.normal(size=(reference_size, dim))
    features = {}
    if reference == "images":
        features["inception/real"] = reference_images
    else:
        features["inception/reference_mu"], features["inception/reference_sigma"] = \
            reference_images.mean(0), np.cov(reference_images, rowvar=False)
    rows = []

    def add(method, w, scores, values):
        features[evidence.INCEPTION_PREFIX + evidence.feature_key(method, w)] = values
        rows.extend({"sample": i, "prompt": int(prompts[i]), "method": method, "w": w, "clip_score": float(s)}
                    for i, s in enumerate(scores))

    add("unguided", None, 25 + prompt_effect + rng.normal(size=n), rng.normal(size=(n, dim)) * 1.2)
    for w in WS:
        cfg = 30 + prompt_effect + rng.normal(size=n)
        cfg_features = rng.normal(size=(n, dim)) * (1 + 0.1 * w) + 0.2 * w
        add("cfg", w, cfg, cfg_features)
        noise = rng.normal(size=n) * 2
        agd = {"cfg": cfg, "same": cfg + noise - noise.mean(), "lower": cfg - 5}[agd_clip]
        add("agd", w, agd, cfg_features + rng.normal(size=cfg_features.shape) * 0.05)
    return rows, features


REAL_KEYS = ("inception_fid_unguided", "inception_fid_cfg", "inception_fid_agd", "inception_fid_ratio_agd_over_cfg",
             "clip_score_unguided", "clip_score_cfg", "clip_score_agd", "clip_score_difference_agd_minus_cfg")


def test_real_model_points_are_the_real_metrics_numbers_and_intervals_contain_them():
    from agd_pipeline.real_metrics import clip_score_of, fid_from_features

    for reference in ("images", "statistics"):
        rows, features = _synthetic_real(reference=reference)
        real = evidence.assess([], features, IN_RANGE, None, replicates=200, real_rows=rows)
        assert set(real) == {"real_model", "bootstrap"} and real["bootstrap"]["clusters"] == "prompt"
        about = real["real_model"]["fid_reference"]
        assert about["kind"] == reference and about["resampled"] == (reference == "images")
        stats = ({"features": features["inception/real"]} if reference == "images" else
                 {"mu": features["inception/reference_mu"], "sigma": features["inception/reference_sigma"]})
        for w in WS:
            row = real["real_model"]["per_w"][f"w{w:g}"]
            assert set(row) == set(REAL_KEYS)
            for key in REAL_KEYS:
                assert row[key]["low"] <= row[key]["point"] <= row[key]["high"], (reference, w, key)
            for method in ("cfg", "agd"):
                name = evidence.feature_key(method, w)
                # the points are what agd_pipeline.real_metrics gives for the same per-sample data
                assert row[f"inception_fid_{method}"]["point"] == pytest.approx(
                    fid_from_features(features[f"inception/{name}"], stats), rel=1e-9)
                scores = [r["clip_score"] for r in rows if (r["method"], r["w"]) == (method, w)]
                assert row[f"clip_score_{method}"]["point"] == pytest.approx(clip_score_of(np.array(scores)), rel=1e-12)
            ratio = row["inception_fid_agd"]["point"] / row["inception_fid_cfg"]["point"]
            assert row["inception_fid_ratio_agd_over_cfg"]["point"] == pytest.approx(ratio)


def test_real_model_intervals_shrink_with_more_samples():
    def widths(n):
        # the reference grows alike: it is drawn on its own, and its share of the width does not shrink
        rows, features = _synthetic_real(n=n, agd_clip="same", reference_size=n)
        per_w = evidence.assess([], features, IN_RANGE, None, replicates=200, real_rows=rows)["real_model"]["per_w"]
        return {key: per_w["w3"][key]["high"] - per_w["w3"][key]["low"] for key in REAL_KEYS}

    small, large = widths(40), widths(320)
    for key in ("inception_fid_cfg", "inception_fid_agd", "clip_score_cfg", "clip_score_difference_agd_minus_cfg"):
        assert large[key] < 0.6 * small[key], (key, small[key], large[key])


def test_agd_with_cfg_clip_scores_gives_a_difference_interval_around_zero():
    for like in ("cfg", "same"):
        rows, _ = _synthetic_real(n=160, agd_clip=like)
        per_w = evidence.assess([], {}, IN_RANGE, None, replicates=400, real_rows=rows)["real_model"]["per_w"]
        for w in WS:
            diff = per_w[f"w{w:g}"]["clip_score_difference_agd_minus_cfg"]
            assert diff["low"] <= 0 <= diff["high"], (like, w, diff)
            assert diff["high"] - diff["low"] < (1 if like == "same" else 1e-9)
    rows, _ = _synthetic_real(n=160, agd_clip="lower")  # and a real loss is seen as one
    per_w = evidence.assess([], {}, IN_RANGE, None, replicates=400, real_rows=rows)["real_model"]["per_w"]
    assert all(per_w[f"w{w:g}"]["clip_score_difference_agd_minus_cfg"]["high"] < -4 for w in WS)


def test_real_model_intervals_share_the_judges_draw_and_leave_its_numbers_alone():
    """Beside a judge's outcomes (the embedded text defaults with fid_reference / clip_model): the
    judge's numbers are those without the real-model data, and the real model's use the same draw."""
    judge_rows, judge_features = _synthetic(n=120)
    rows, features = _synthetic_real(n=120, per_prompt=1)
    alone = evidence.assess(judge_rows, judge_features, IN_RANGE, 1.0, replicates=100)
    both = evidence.assess(judge_rows, {**judge_features, **features}, IN_RANGE, 1.0, replicates=100, real_rows=rows)
    assert {k: v for k, v in both.items() if k != "real_model"} == alone
    only = evidence.assess([], features, IN_RANGE, None, replicates=100, real_rows=rows)
    assert both["real_model"] == only["real_model"]
    shuffled = [{**r, "prompt": (r["prompt"] + 1) % 120} for r in rows]
    with pytest.raises(evidence.EvidenceError, match="not those of the outcomes"):
        evidence.assess(judge_rows, {**judge_features, **features}, IN_RANGE, 1.0, replicates=10, real_rows=shuffled)


def test_real_outcomes_round_trip_and_fid_only_runs(tmp_path):
    rows, features = _synthetic_real(n=40)
    path = tmp_path / evidence.REAL_OUTCOMES
    evidence.write_outcomes(path, [{**r, "clip_score": f"{r['clip_score']:.17g}"} for r in rows], evidence.REAL_COLUMNS)
    assert evidence.read_outcomes(path, evidence.REAL_COLUMNS) == rows
    text = path.read_text()
    path.write_text(text.replace(",agd,1.5,", ",agd,,", 1))
    with pytest.raises(evidence.EvidenceError, match="line"):
        evidence.read_outcomes(path, evidence.REAL_COLUMNS)
    # Inception FID without a CLIP model: no clip_score, FID intervals only
    fid_only = [{**r, "clip_score": None} for r in rows]
    per_w = evidence.assess([], features, IN_RANGE, None, replicates=50, real_rows=fid_only)["real_model"]["per_w"]
    assert set(per_w["w8"]) == {k for k in REAL_KEYS if k.startswith("inception")}
    with pytest.raises(evidence.EvidenceError, match="no Inception features of agd_w8"):
        evidence.assess([], {k: v for k, v in features.items() if k != "inception/agd_w8"}, IN_RANGE, None,
                        replicates=10, real_rows=fid_only)


def _real_only_folder(tmp_path: Path) -> Path:
    """A real checkpoint's evaluate folder (no judge): real_outcomes.csv, features.npz, metrics.json."""
    folder = tmp_path / "eval"
    folder.mkdir()
    rows, features = _synthetic_real(n=48)
    evidence.write_outcomes(folder / evidence.REAL_OUTCOMES, [{**r, "clip_score": f"{r['clip_score']:.17g}"}
                                                              for r in rows], evidence.REAL_COLUMNS)
    np.savez_compressed(folder / evidence.FEATURES, **{k: v.astype(np.float32) for k, v in features.items()})
    features = dict(np.load(folder / evidence.FEATURES))
    assessed = evidence.assess([], features, IN_RANGE, None, replicates=100, real_rows=rows)
    speed = evidence.speed_summary({"48": _timings([2.0] * 5, [1.0] * 5, [0.95] * 5)}, {"cfg": 8, "agd": 4},
                                   {"48": 48}, "48")
    per_w = {f"w{w:g}": {"w": w, "in_training_range": w in IN_RANGE, "accuracy_cfg": None, "accuracy_agd": None,
                         "accuracy_unguided": None, "fid_cfg": None, "fid_agd": None, "fid_unguided": None,
                         "fid_to_cfg_agd": None, "fid_to_cfg_unguided": None, "rmse_to_cfg_agd": 0.1,
                         "images_per_second_cfg": 30.0, "images_per_second_agd": 60.0,
                         "speed_ratio_agd_over_cfg": 2.0, "nfe_per_image_cfg": 8, "nfe_per_image_agd": 4}
             for w in WS}
    metrics = {"num_steps": 4, "samples_per_w": 48, "split": "validation", "training_range": [1.0, 6.0],
               "conditioning": "text", "per_w": per_w, "speed": speed,
               "summary_in_training_range": {"speed_ratio_agd_over_cfg": 2.0}, "evidence": assessed}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def test_report_renders_and_checks_the_real_model_intervals(tmp_path, capsys):
    folder = _real_only_folder(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\n<!-- results:end -->\n")
    assert _report("--metrics", folder / "metrics.json", "--readme", readme) == 0
    text = readme.read_text()
    assert "reported, not judged" in text and "| w | Inception FID unguided |" in text and "CLIP AGD − CFG" in text
    assert "200 reference images" in text
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 0
    # one CLIP score edited in the per-sample file: the stored intervals no longer follow from it
    outcomes = folder / evidence.REAL_OUTCOMES
    good = outcomes.read_text()
    lines = good.splitlines()
    row = next(i for i, line in enumerate(lines) if ",agd,3," in line)
    lines[row] = lines[row].rsplit(",", 1)[0] + ",99"
    outcomes.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 1
    assert "clip_score" in capsys.readouterr().err
    outcomes.write_text(good)
    # the Inception features of one sample set changed
    with np.load(folder / evidence.FEATURES) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["inception/cfg_w1.5"] = arrays["inception/cfg_w1.5"] * 1.1
    np.savez_compressed(folder / evidence.FEATURES, **arrays)
    assert _report("--metrics", folder / "metrics.json", "--readme", readme, "--check") == 1
    assert "inception_fid_cfg" in capsys.readouterr().err


def test_report_names_a_statistics_reference_as_fixed():
    from stages.report import _real_model

    rows, features = _synthetic_real(n=40, reference="statistics")
    assessed = evidence.assess([], features, IN_RANGE, None, replicates=50, real_rows=rows)
    metrics = {"per_w": {f"w{w:g}": {"w": w, "in_training_range": w in IN_RANGE} for w in WS}, "evidence": assessed}
    text = "\n".join(_real_model(metrics, list(metrics["per_w"].values())))
    assert "precomputed reference statistics" in text and "only the samples are drawn" in text


def test_report_shows_the_real_model_table_beside_a_judges_results():
    from stages.report import render

    rows, features = _synthetic(n=40)
    real_rows, real_features = _synthetic_real(n=40, per_prompt=1)
    assessed = evidence.assess(rows, {**features, **real_features}, IN_RANGE, 1.0, replicates=30, real_rows=real_rows)
    speed = evidence.speed_summary({"40": _timings([2.0] * 5, [1.0] * 5, [0.95] * 5)}, {"cfg": 8, "agd": 4},
                                   {"40": 40}, "40")
    metrics = {"num_steps": 4, "samples_per_w": 40, "training_range": [1.0, 6.0], "speed": speed,
               "per_w": {f"w{w:g}": {"w": w, "in_training_range": w in IN_RANGE} for w in WS},
               "summary_in_training_range": {"targets_met": True}, "evidence": {**assessed, "accuracy_tolerance": 1.0}}
    text = render(json.loads(json.dumps(metrics)), "eval/metrics.json", Path("."))
    assert "| target |" in text and text.index("Real-model metrics") < text.index("Speed:")
    assert "| 8 * | " in text.split("Real-model metrics")[1].split("Speed:")[0]
