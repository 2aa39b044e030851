"""Stage `evaluate`: unguided, CFG (2 evaluations per step) and AGD (1 per step) on the same seeds.

Per guidance scale w: FID against held-out real data through clean-fid (in the feature space of the
judge of ``evaluate.judge``, :mod:`agd_pipeline.judges`), class accuracy, fidelity of AGD to CFG (paired distance per
seed, and FID between the two sample sets), evaluations per image, images per second and the
AGD/CFG speed ratio measured in the same run. Writes metrics.json, CSVs for DVC plots, PNG grids.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .adapters import load_adapted_model, read_adapter_config
from .config import EvaluateConfig, check_interval
from .devices import resolve_device
from .errors import ConfigError, command_line, require
from .models import load_base_model, recorded_hub_options
from .sampling import (AGD, CFG, ImageSampler, Unguided, check_num_steps, generators_for, initial_noise, sample,
                       scheduler_for, trajectory_seed)
from . import evidence
from .figures import grid_figure, to_uint8
from .judges import JudgeFeatures, judge_factory, load_judges
from .prompts import EVAL_PROMPTS, NEGATIVE_CHECK, PROMPTS_DIR, TEST_NEGATIVE_CHECK, TEST_PROMPTS, read_eval_prompts
from .results import results_table

METHODS = evidence.METHODS  # unguided, cfg, agd: the outcome files' method names
SPLITS = ("validation", "test")
TEST_STREAM = 3  # the test split's seeds: their own SeedSequence stream (generation uses streams 1 and 2)
SPEED_BATCHES = (1, 8)  # batch sizes timed besides the evaluation batch
SPEED_REPEATS = 5


def evaluation_seeds(split: str, seed: int, count: int) -> list[int]:
    """The noise seed of each evaluation sample. Validation: ``trajectory_seed(seed, i)``, the seeds
    every tuning run and experiment has used. Test: a stream of their own, skipping any seed the
    validation split of the same size uses, so a decision taken on validation never saw a test seed."""
    validation = [trajectory_seed(seed, i) for i in range(count)]
    if split == "validation":
        return validation
    if split != "test":
        raise ConfigError(f"evaluate.split: {split!r} is not one of {', '.join(SPLITS)}")
    taken, seeds, index = set(validation), [], 0
    while len(seeds) < count:
        candidate = int(np.random.SeedSequence([seed, index, TEST_STREAM]).generate_state(1, np.uint32)[0])
        index += 1
        if candidate not in taken:
            taken.add(candidate)
            seeds.append(candidate)
    return seeds


def write_pngs(images: np.ndarray, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


class CleanFid:
    """FID between image folders through clean-fid, in a custom feature space.

    Each folder's features are extracted once (clean-fid's own loader and resizing) and reused for
    every pair it appears in: the real and unguided folders meet every w.
    """

    def __init__(self, extractor):
        self.extractor = extractor
        self._features: dict[Path, np.ndarray] = {}

    def features(self, folder: Path) -> np.ndarray:
        fid = require("cleanfid.fid", "FID")

        if folder not in self._features:
            self._features[folder] = fid.get_folder_features(
                str(folder), self.extractor, num_workers=0, batch_size=1000, device=torch.device("cpu"),
                mode="clean", custom_fn_resize=lambda img: img,  # the judge takes the images' own size
                verbose=False)
        return self._features[folder]

    def __call__(self, folder_a: Path, folder_b: Path) -> float:
        fid = require("cleanfid.fid", "FID")

        return float(fid.fid_from_feats(self.features(folder_a), self.features(folder_b)))


def curves_figure(rows: list[dict], training_range, path: Path, accuracy_label: str = "class accuracy") -> None:
    matplotlib = require("matplotlib", "the curves figure (curves.png)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["w"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, style in zip(METHODS, ("k:", "C0-o", "C1--s")):
        ax1.plot(ws, [r[f"fid_{method}"] for r in rows], style, label=method)
        ax2.plot(ws, [r[f"accuracy_{method}"] for r in rows], style, label=method)
    for ax in (ax1, ax2):
        ax.axvspan(*training_range, color="0.92", zorder=0, label="training range")
        ax.set_xlabel("guidance scale w")
    ax1.set_ylabel("FID vs held-out data")
    ax2.set_ylabel(accuracy_label)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Judges:
    """What a sample set is measured by: class accuracy under the judge of ``evaluate.judge`` (a
    factory returning an :class:`agd_pipeline.judges.JudgeBundle` for the base), FID in that judge's
    feature space against its held-out real images (written once as PNGs) and between sample sets,
    the second judge's verdicts and FIDs where the bundle has one; and, for real checkpoints, the
    Inception FID and CLIP score (:meth:`real_model_metrics`)."""

    def __init__(self, base_id: str, labels: torch.Tensor | None, real_dir: Path, fid_reference: str = "",
                 clip_model: str = "", prompts: list[str] | None = None, device="cpu", judge: str = ""):
        self.fid_reference, self.clip_model, self.prompts, self.device = fid_reference, clip_model, prompts, device
        # real checkpoints: the reference (loaded once) and the per-sample data of every sample set, by
        # (method, w): Inception features and CLIP scores (the intervals' inputs)
        self.reference: dict | None = None
        self.inception: dict[tuple[str, float | None], np.ndarray] = {}
        self.clip: dict[tuple[str, float | None], np.ndarray] = {}
        bundle = load_judges(judge, base_id)
        self.judge = bundle.judge if bundle is not None else None
        self.fid = CleanFid(JudgeFeatures(self.judge)) if self.judge is not None else None
        real = bundle.real_images if bundle is not None else None
        self.labels, self.real_dir, self.has_real = labels, real_dir, real is not None
        if real is not None:
            write_pngs(to_uint8(torch.as_tensor(np.asarray(real))), real_dir)
        # the second judge: its own classifier and reference images, where the bundle has one
        self.second = self.second_fid = self.second_real_dir = self.second_report = None
        if bundle is not None and bundle.second is not None:
            self.second, self.second_report = bundle.second.judge, bundle.second.report
            self.second_real_dir = real_dir.parent / "real_second_judge"
            write_pngs(to_uint8(torch.as_tensor(np.asarray(bundle.second.reference_images))), self.second_real_dir)
            self.second_fid = CleanFid(JudgeFeatures(self.second))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.judge.predict(images.float().clamp(-1, 1))

    def judged(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The class each judge sees in each image: (first judge, second judge or None); None
        without a judge or without labels."""
        if self.judge is None or self.labels is None:
            return None
        second = None
        if self.second is not None:
            with torch.no_grad():
                second = self.second.predict(images.float().clamp(-1, 1)).numpy()
        return self.predict(images).numpy(), second

    def accuracy(self, images: torch.Tensor) -> float | None:
        if self.judge is None or self.labels is None:
            return None
        # a count over the number of samples, in float64: float32's mean put 600-sample accuracies
        # off by ~1e-8, so a drop of exactly 12 samples in 600 read as 2.000004 points
        return int((self.predict(images) == self.labels).sum()) / len(self.labels)

    def fid_real(self, folder: Path) -> float | None:
        return self.fid(folder, self.real_dir) if self.fid and self.has_real else None

    def fid_between(self, a: Path, b: Path) -> float | None:
        return self.fid(a, b) if self.fid else None

    def real_model_metrics(self, method: str, folder: Path, pixels: np.ndarray, w: float | None = None) -> dict:
        """Inception FID against ``evaluate.fid_reference`` and the CLIP score under
        ``evaluate.clip_model``, where set (real checkpoints): the numbers real_metrics.inception_fid
        and clip_score give, from per-sample data kept for the intervals (:meth:`real_rows`)."""
        from . import real_metrics

        out, key = {}, (method, w)
        if self.fid_reference:
            if self.reference is None:  # a reference folder's features are extracted once, not per sample set
                self.reference = real_metrics.load_reference(self.fid_reference, device=self.device)
            self.inception[key] = real_metrics.inception_features(folder, device=self.device)
            out[f"inception_fid_{method}"] = real_metrics.fid_from_features(
                self.inception[key], self.reference, f"FID of {folder} against {Path(self.fid_reference)}")
        if self.clip_model:
            self.clip[key] = real_metrics.clip_scores(pixels, self.prompts, self.clip_model, device=self.device)
            out[f"clip_score_{method}"] = real_metrics.clip_score_of(self.clip[key])
        return out

    def real_rows(self, prompt_ids: np.ndarray) -> list[dict]:
        """The rows of real_outcomes.csv: each sample's prompt and, under a CLIP model, its CLIP score,
        per sample set; none without evaluate.fid_reference and evaluate.clip_model."""
        rows = []
        for method, w in self.inception or self.clip:
            clip = self.clip.get((method, w))
            rows += [{"sample": i, "prompt": int(prompt), "method": method, "w": w,
                      # every digit, so that the file gives back the number the intervals were computed from
                      "clip_score": f"{clip[i]:.17g}" if clip is not None else None}
                     for i, prompt in enumerate(prompt_ids)]
        return rows

    def inception_arrays(self) -> dict[str, np.ndarray]:
        """features.npz's Inception arrays: every sample set's, and the reference's features (a folder)
        or its mu and sigma (statistics: fixed in the intervals)."""
        if not self.inception:
            return {}
        arrays = {evidence.INCEPTION_PREFIX + evidence.feature_key(method, w): value
                  for (method, w), value in self.inception.items()}
        if "features" in self.reference:
            arrays[evidence.INCEPTION_PREFIX + "real"] = self.reference["features"]
        else:
            arrays.update({evidence.INCEPTION_PREFIX + evidence.REFERENCE_MU: self.reference["mu"],
                           evidence.INCEPTION_PREFIX + evidence.REFERENCE_SIGMA: self.reference["sigma"]})
        return arrays


def check_extras() -> None:
    """Refuse before anything runs when a package of the ``[eval]`` extra that every evaluation uses
    (clean-fid and its torchvision, scipy, matplotlib) is missing, naming the install."""
    for module, purpose in (("cleanfid.fid", "FID"), ("scipy.stats", "the 95 % intervals"),
                            ("matplotlib", "the evaluation's figures")):
        require(module, f"evaluate: {purpose}")


def evaluate(config: EvaluateConfig, progress: bool = True, log=print) -> dict:
    check_extras()  # before minutes of sampling: FID, the intervals and the figures need the [eval] extra
    if config.judge:
        judge_factory(config.judge)  # an evaluate.judge that cannot be imported: said before anything loads
    # -- the adapters and their base ----------------------------------------------------------
    adapter_config = read_adapter_config(config.adapters)
    base_id = config.base_model or adapter_config["base_model"]["id"]
    recorded = {} if config.base_model else recorded_hub_options(adapter_config["base_model"])
    base = load_base_model(base_id, device=resolve_device(config.device), **recorded)
    adapted = load_adapted_model(config.adapters, base)
    override = check_interval(config.guidance_interval, "evaluate.guidance_interval")
    if override is not None:  # CFG and AGD alike; [0, 1] is every step
        adapted.guidance_interval = None if override == (0.0, 1.0) else override
    steps = config.num_steps or adapter_config["sampler"]["num_steps"]
    check_num_steps(base, steps, "evaluate.num_steps")
    training_range = (adapter_config["guidance"]["min"], adapter_config["guidance"]["max"])

    # -- the same seeds (and classes) for every method ------------------------------------------
    out, samples_dir, grids_dir = _output_folders(config.out_dir)
    labels, conditions, uncond, prompts_file, prompts = evaluation_set(config, base, base_id, adapter_config)
    n = len(labels)
    seeds = evaluation_seeds(config.split, config.seed, n)
    scheduler = scheduler_for(base, adapter_config.get("sampler"), config.scheduler, "evaluate.scheduler")
    sampler = ImageSampler(base, conditions, seeds, steps, config.batch_size, scheduler)
    judges = Judges(base_id, labels if labels.min() >= 0 else None, samples_dir / "real", config.fid_reference,
                    config.clip_model, prompts, base.device, judge=config.judge)

    # -- unguided once, then CFG (2 NFE/step) against AGD (1 NFE/step) at every w --------------
    baseline, unguided_seconds = _unguided_baseline(sampler, base, judges, samples_dir)
    rows, judged, timed = [], {}, {m: [] for m in METHODS}  # timed: seconds per w pass (speed repeats)
    for w in tqdm(config.guidance_scales, desc="evaluate: guidance scales", disable=not progress):
        # The three methods take turns, the first one rotating from one w to the next, so drift in a
        # shared machine's speed hits all alike (within a w too: ImageSampler.run_interleaved).
        row = _compare_at(w, sampler, base, adapted, judges, baseline, samples_dir, uncond, shift=len(rows),
                          in_range=training_range[0] <= w <= training_range[1])
        _grid_at(w, row, baseline, labels, config.grid_columns, bool(prompts_file), grids_dir)
        judged[w] = row.pop("judged")
        for method, seconds in row.pop("seconds").items():
            timed[method].append(seconds)
        rows.append(row)
    negative = None
    if base.conditioning == "text" and config.negative_check_scale > 0:
        negative = negative_prompt_check(config, base, adapted, base_id, steps, scheduler, judges, grids_dir, out)

    # -- intervals, speed, metrics, plots and the table -----------------------------------------
    in_range = [r["w"] for r in rows if r["in_training_range"]] or [r["w"] for r in rows]
    tolerance = evidence.ACCURACY_TOLERANCE[base.conditioning]
    assessed = write_evidence(out, judges, baseline["judged"], judged, samples_dir, in_range, tolerance,
                              prompt_ids=_prompt_ids(base, n, config.samples_per_class))
    if negative is not None and assessed is not None:
        assessed["negative"] = negative.pop("evidence")
    speed = measure_speed(sampler, base, adapted, rows, timed, in_range[0], uncond)
    metrics = {
        "num_steps": steps, "samples_per_w": n, "batch_size": config.batch_size, "split": config.split,
        "training_range": list(training_range), "unguided_images_per_second": n / unguided_seconds,
        "conditioning": base.conditioning,
        "guidance_interval": list(adapted.guidance_interval) if adapted.guidance_interval else None,
        "summary_in_training_range": summarise(assessed, speed),
        "per_w": {f"w{r['w']:g}": r for r in rows},
        "speed": speed,
        "adapters": {key: adapted.parameter_report()[key] for key in ("adapter", "share")},
    }
    if assessed is not None:
        metrics["evidence"] = {**assessed, **({"accuracy_tolerance": tolerance} if "summary" in assessed else {})}
    if judges.second is not None:
        metrics["second_judge"] = judges.second_report
    if prompts_file:
        metrics["prompts_file"] = str(prompts_file)
    if negative is not None:
        metrics["negative_prompt_check"] = negative
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = summary_metrics(metrics, config, adapted, adapter_config, conditions, uncond)
    (out / SUMMARY).write_text(json.dumps(rounded_summary(summary), indent=2) + "\n")
    _write_plot_csvs(out, rows)
    if judges.judge is not None:
        curves_figure(rows, training_range, out / "curves.png",
                      "prompt accuracy" if base.conditioning == "text" else "class accuracy")
    log(format_table(rows))
    if negative is not None:
        log(format_negative_check(negative))
    return metrics


SUMMARY = "summary.json"  # DVC's metrics file: the run in a few numbers (per-w detail: metrics.json, the CSVs)
GAP_CLOSED_TRAJECTORIES = 400
GAP_CLOSED_SEED = {"validation": 999, "test": 7919}  # run seeds of the fresh trajectories, one per split


SUMMARY_DIGITS = 6  # significant digits: float noise (0.5000000000000004) off, every table's precision kept


def rounded_summary(summary: dict) -> dict:
    """The summary as DVC shows it: floats to :data:`SUMMARY_DIGITS` significant digits (metrics.json
    keeps the full values, from which ``stages.report --check`` recomputes every interval)."""
    return {key: float(f"{value:.{SUMMARY_DIGITS}g}") if isinstance(value, float) else value
            for key, value in summary.items()}


def summary_metrics(metrics: dict, config: EvaluateConfig, adapted, adapter_config: dict,
                    conditions: dict | None = None, uncond: dict | None = None) -> dict:
    """What ``dvc exp show`` lists per run: the in-range summary, the unguided accuracy, the gap
    closed on fresh CFG trajectories (:func:`gap_closed`; text models: of the evaluation prompts,
    ``conditions``), and the adapters' size and training data (:func:`training_data_summary`)."""
    rows = list(metrics["per_w"].values())
    summary = {"accuracy_unguided": rows[0]["accuracy_unguided"] if rows else None,
               **metrics["summary_in_training_range"], "num_steps": metrics["num_steps"]}
    in_range = [r for r in rows if r["in_training_range"]]
    outside = [r for r in rows if not r["in_training_range"]]
    for key in ("accuracy_cfg", "accuracy_agd", "fid_cfg", "fid_agd", "rmse_to_cfg_agd"):
        values = [r.get(key) for r in in_range]  # None where the run has no judge for it
        summary[f"mean_{key}"] = float(np.mean(values)) if values and None not in values else None
    # the w evaluated outside the training range (unseen w), worst case over them
    summary["outside_max_accuracy_drop_points"] = max(
        (100 * (r["accuracy_cfg"] - r["accuracy_agd"]) for r in outside if r["accuracy_cfg"] is not None),
        default=None)
    summary["outside_max_fidelity_ratio"] = max(
        (r["fid_to_cfg_agd"] / r["fid_to_cfg_unguided"] for r in outside if r["fid_to_cfg_unguided"]), default=None)
    # on the base evaluated (evaluate.base_model, if given); text models: with the evaluation prompts
    if adapted.base.conditioning == "class" or conditions is not None:
        result = gap_closed(config.adapters, GAP_CLOSED_TRAJECTORIES, seed=GAP_CLOSED_SEED[config.split],
                            steps=config.num_steps, adapted=adapted,
                            scheduler=config.scheduler, conditions=None if adapted.base.conditioning == "class"
                            else conditions, uncond=uncond)
        summary["gap_closed"] = result["overall"]
    summary.update(training_data_summary(adapter_config, adapted))
    return summary


def training_data_summary(adapter_config: dict, adapted) -> dict:
    """What the adapters cost and were trained on: their parameters (and share of the base's),
    the (x, t, w) pairs of their store, and the store's size on disk where it is still there."""
    from .store.files import folder_bytes

    parameters = adapted.parameter_report()
    store = adapter_config.get("store") or {}
    trajectories = store.get("trajectories")
    steps = (adapter_config.get("sampler") or {}).get("num_steps")
    path = Path(store["path"]) if store.get("path") else None
    size = folder_bytes(path) if path is not None and path.is_dir() else None
    return {"adapter_parameters": parameters["adapter"], "adapter_share": parameters["share"],
            "training_pairs": trajectories * steps if trajectories and steps else None,
            "store_megabytes": size / 2**20 if size is not None else None}




def evaluation_set(config: EvaluateConfig, base, base_id: str, adapter_config: dict):
    """(label per sample, conditions per sample, CFG's unconditional condition, the prompts file, the
    prompt per sample); the last three are None for class models.

    Class models: ``samples_per_class`` samples of every class, classes cycled. Text models: every
    prompt of ``evaluate.prompts_file`` (default: the base folder's prompts/eval.tsv)
    ``samples_per_class`` times; the label is the digit a ``digit<TAB>prompt`` line asks for (-1
    when the file gives none: no accuracy then). CFG's unconditional branch is the negative prompt
    the adapters were distilled with (empty: the pipeline's default); adapters that see the
    negative prompt get its embeddings per sample."""
    from .inference import negative_conditions
    from .models import encode_prompts

    if base.conditioning == "class":
        if config.clip_model:
            raise ConfigError("evaluate.clip_model: the CLIP score compares images with their prompts; "
                              f"{base.model_id!r} is class-conditional")
        for key in ("prompts_file", "negative_check_scale"):
            if getattr(config, key):
                raise ConfigError(f"evaluate.{key}: {base.model_id!r} is class-conditional; prompts and the "
                                  "negative-prompt check are for text-to-image models (leave it empty or 0)")
        if config.samples_per_class < 2:
            raise ConfigError(f"evaluate.samples_per_class: needs at least 2 for FID statistics per class (got "
                              f"{config.samples_per_class})")
        labels = torch.arange(config.samples_per_class * base.num_classes) % base.num_classes
        return labels, base.class_condition(labels), None, None, None
    # the base folder's own prompt sets (agd_pipeline.prompts): validation (eval.tsv, the one tuning
    # used) or test (the embedded text defaults': held-out phrasings that neither the base's captions
    # nor stage one's prompts contain)
    own = TEST_PROMPTS if config.split == "test" else EVAL_PROMPTS
    prompts_file = Path(config.prompts_file) if config.prompts_file else Path(base_id) / PROMPTS_DIR / own
    if not config.prompts_file and not prompts_file.is_file():
        raise ConfigError(f"evaluate.prompts_file: {base.model_id!r} is a text-to-image model without its own "
                          f"{config.split} prompts ({prompts_file} is missing; a base made before the test split "
                          "existed has only prompts/eval.tsv: rebuild it or set evaluate.split to validation); "
                          "otherwise give a file with one prompt per line, or 'digit<TAB>prompt' lines")
    prompts, digits = read_eval_prompts(prompts_file)
    table, uncond = encode_prompts(base, prompts, adapter_config.get("negative_prompt", ""))
    index = torch.arange(len(prompts)).repeat_interleave(config.samples_per_class)
    conditions = {name: value[index] for name, value in table.items()}
    if "negative_text" in adapter_config["adapter"]["condition_on"]:
        conditions.update(negative_conditions(uncond, len(index)))
    if len(index) < 2:
        raise ConfigError(f"{prompts_file}: one prompt x samples_per_class 1 is one image; FID needs at least 2")
    labels = torch.tensor(digits)[index] if digits is not None else torch.full((len(index),), -1)
    return labels, conditions, uncond, prompts_file, [prompts[i] for i in index.tolist()]


def negative_prompt_check(config: EvaluateConfig, base, adapted, base_id: str, steps: int, scheduler, judges: Judges,
                          grids_dir: Path, out: Path) -> dict:
    """How often the digit a negative prompt names still appears, under a prompt that names no digit.

    For each digit d of the base's prompts/negative_check.json: ``negative_check_samples`` samples of
    its digit-agnostic prompt with the negative prompt naming d, at w = ``negative_check_scale``:
    unguided (the prompt alone), CFG (the negative prompt as its unconditional branch) and AGD (the
    adapters told the negative prompt). Avoidance = the unguided rate of d minus the method's rate."""
    from .inference import negative_conditions
    from .models import encode_prompts

    name = TEST_NEGATIVE_CHECK if config.split == "test" else NEGATIVE_CHECK
    path = Path(base_id) / PROMPTS_DIR / name
    if not path.is_file() or judges.judge is None:
        raise ConfigError(f"evaluate.negative_check_scale: {base.model_id!r} has no negative-prompt check "
                          f"({path} and a judge, evaluate.judge: the embedded text defaults have both); set it to 0")
    check = json.loads(path.read_text())
    digits = sorted(int(d) for d in check["negatives"])
    per = config.negative_check_samples
    targets = torch.tensor(digits).repeat_interleave(per)
    negatives = [check["negatives"][str(int(d))] for d in targets]
    table, uncond = encode_prompts(base, [check["prompt"]], negatives)
    conditions = {name: value.expand(len(targets), *value.shape[1:]) for name, value in table.items()}
    with_negative = {**conditions, **negative_conditions(uncond, len(targets))}
    w = config.negative_check_scale
    seeds = evaluation_seeds(config.split, config.seed + 1, len(targets))
    images, rates, outcome_rows = {}, {}, []
    methods = (("unguided", Unguided(base), conditions),
               ("cfg", CFG(base, w, uncond, adapted.guidance_interval), conditions),
               ("agd", AGD(adapted, w), with_negative))
    for method, denoiser, conds in methods:
        sampler = ImageSampler(base, conds, seeds, steps, config.batch_size, scheduler)
        images[method], _ = sampler.run(denoiser)
        judged = judges.predict(images[method])
        rates[method] = float((judged == targets).float().mean())
        outcome_rows += [{"sample": i, "negative_digit": int(d), "method": method, "judged": int(c),
                          "shows_negative_digit": int(c == d)} for i, (d, c) in enumerate(zip(targets, judged))]
    evidence.write_outcomes(out / evidence.NEGATIVE_OUTCOMES, outcome_rows, evidence.NEGATIVE_COLUMNS)
    avoid_cfg, avoid_agd = rates["unguided"] - rates["cfg"], rates["unguided"] - rates["agd"]
    panels = {f"unguided: '{check['prompt']}'": to_uint8(images["unguided"]),
              f"CFG w={w:g}, negative 'the digit <row>'": to_uint8(images["cfg"]),
              f"AGD w={w:g}, same negative": to_uint8(images["agd"])}
    grid_figure(panels, targets.numpy(), config.grid_columns, "negative prompt naming the row's digit",
                grids_dir / "negative_prompt.png")
    return {"w": w, "prompt": check["prompt"], "samples_per_digit": per,
            "negative_digit_rate": rates, "avoidance_cfg": avoid_cfg, "avoidance_agd": avoid_agd,
            "avoidance_ratio_agd_over_cfg": avoid_agd / avoid_cfg if avoid_cfg > 0 else None,
            "evidence": evidence.negative_summary(outcome_rows)}


def format_negative_check(check: dict) -> str:
    rates = check["negative_digit_rate"]
    ratio = check["avoidance_ratio_agd_over_cfg"]
    return (f"negative-prompt check (w={check['w']:g}, prompt {check['prompt']!r}, negative naming a digit): "
            f"that digit appears in {100 * rates['unguided']:.1f} % unguided, {100 * rates['cfg']:.1f} % CFG, "
            f"{100 * rates['agd']:.1f} % AGD; AGD avoids it "
            + (f"{ratio:.2f}x as well as CFG" if ratio is not None else "(CFG does not avoid it at all)"))


def _compare_at(w: float, sampler: ImageSampler, base, adapted, judges: Judges, baseline: dict, samples_dir: Path,
                uncond: dict | None, shift: int, in_range: bool) -> dict:
    """CFG and AGD at one w from the same seeds: samples as PNGs, and the row of metrics.json (plus
    both pixel sets for the grid, the judged classes and the seconds of each method). The unguided
    model is sampled again beside them (the same images) so that every w pass times all three."""
    tag = f"w{w:g}"
    cfg, agd, unguided = CFG(base, w, uncond, adapted.guidance_interval), AGD(adapted, w), Unguided(base)
    methods = [cfg, agd, unguided]
    order = methods[shift % 3:] + methods[:shift % 3]
    results = dict(zip(order, sampler.run_interleaved(order)))
    (cfg_images, cfg_seconds), (agd_images, agd_seconds) = results[cfg], results[agd]
    cfg_pixels, agd_pixels = to_uint8(cfg_images), to_uint8(agd_images)
    cfg_dir, agd_dir = samples_dir / "cfg" / tag, samples_dir / "agd" / tag
    write_pngs(cfg_pixels, cfg_dir)
    write_pngs(agd_pixels, agd_dir)
    n = len(cfg_images)
    batches = -(-n // sampler.batch_size)
    return {
        "w": w, "in_training_range": in_range,
        "fid_unguided": baseline["fid"], "fid_cfg": judges.fid_real(cfg_dir), "fid_agd": judges.fid_real(agd_dir),
        "accuracy_unguided": baseline["accuracy"], "accuracy_cfg": judges.accuracy(cfg_images),
        "accuracy_agd": judges.accuracy(agd_images),
        "fid_to_cfg_unguided": judges.fid_between(samples_dir / "unguided", cfg_dir),
        "fid_to_cfg_agd": judges.fid_between(agd_dir, cfg_dir),
        "rmse_to_cfg_unguided": paired_rmse(baseline["images"], cfg_images),
        "rmse_to_cfg_agd": paired_rmse(agd_images, cfg_images),
        # counted, not assumed: outside a guidance interval CFG makes one evaluation a step
        "nfe_per_image_cfg": cfg.evaluations // batches, "nfe_per_image_agd": sampler.steps,
        "images_per_second_cfg": n / cfg_seconds, "images_per_second_agd": n / agd_seconds,
        "images_per_second_unguided": n / results[unguided][1],
        "speed_ratio_agd_over_cfg": cfg_seconds / agd_seconds,
        **baseline["real"], **judges.real_model_metrics("cfg", cfg_dir, cfg_pixels, w),
        **judges.real_model_metrics("agd", agd_dir, agd_pixels, w),
        "cfg_pixels": cfg_pixels, "agd_pixels": agd_pixels,
        "judged": {"cfg": judges.judged(cfg_images), "agd": judges.judged(agd_images)},
        "seconds": {"cfg": cfg_seconds, "agd": agd_seconds, "unguided": results[unguided][1]},
    }


def _output_folders(out_dir: str) -> tuple[Path, Path, Path]:
    """(the output folder, its samples/ and its grids/, the grids emptied first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples_dir, grids_dir = out / "samples", out / "grids"
    shutil.rmtree(grids_dir, ignore_errors=True)
    grids_dir.mkdir(parents=True)
    return out, samples_dir, grids_dir


def _unguided_baseline(sampler: ImageSampler, base, judges: Judges, samples_dir: Path) -> tuple[dict, float]:
    """The unguided model's samples (as PNGs too), what the judges make of them, and its seconds."""
    unguided, seconds = sampler.run(Unguided(base))
    baseline = {"images": unguided, "pixels": to_uint8(unguided), "judged": judges.judged(unguided)}
    write_pngs(baseline["pixels"], samples_dir / "unguided")
    baseline.update(fid=judges.fid_real(samples_dir / "unguided"), accuracy=judges.accuracy(unguided),
                    real=judges.real_model_metrics("unguided", samples_dir / "unguided", baseline["pixels"]))
    return baseline, seconds


def _write_plot_csvs(out: Path, rows: list[dict]) -> None:
    """DVC's plot files: FID, accuracy and distance to CFG against w."""
    _write_csv(out / "fid_vs_w.csv", rows, {"unguided": "fid_unguided", "cfg": "fid_cfg", "agd": "fid_agd"})
    _write_csv(out / "accuracy_vs_w.csv", rows,
               {"unguided": "accuracy_unguided", "cfg": "accuracy_cfg", "agd": "accuracy_agd"})
    _write_csv(out / "fidelity_vs_w.csv", rows,
               {"agd_to_cfg": "fid_to_cfg_agd", "unguided_to_cfg": "fid_to_cfg_unguided"})


def _grid_at(w: float, row: dict, baseline: dict, labels: torch.Tensor, columns: int, prompted: bool,
             grids_dir: Path) -> None:
    """The PNG grid of one w: unguided | CFG | AGD from the same seeds (takes the pixels out of ``row``)."""
    panels = {"unguided (1 NFE/step)": baseline["pixels"], f"CFG w={w:g} (2 NFE/step)": row.pop("cfg_pixels"),
              f"AGD w={w:g} (1 NFE/step)": row.pop("agd_pixels")}
    title = f"same seeds, w = {w:g}" + (": rows ask for the digits 0-9 in held-out prompts" if prompted else "")
    grid_figure(panels, labels.numpy(), columns, title, grids_dir / f"w{w:g}.png")


def measure_speed(sampler: ImageSampler, base, adapted, rows: list[dict], timed: dict[str, list[float]], w: float,
                  uncond: dict | None) -> dict:
    """Speed with its spread (:func:`agd_pipeline.evidence.speed_summary`): the w passes are the
    repeats at the evaluation batch; batches of SPEED_BATCHES are timed on their own at ``w``."""
    n = len(sampler.seeds)
    evaluation_batch = min(sampler.batch_size, n)
    timings = {str(evaluation_batch): timed,
               **time_small_batches(sampler, base, adapted, w, uncond, evaluation_batch)}
    return evidence.speed_summary(
        timings, {"cfg": rows[0]["nfe_per_image_cfg"], "agd": rows[0]["nfe_per_image_agd"]},
        {batch: (n if batch == str(evaluation_batch) else int(batch)) for batch in timings}, str(evaluation_batch))


def time_small_batches(sampler: ImageSampler, base, adapted, w: float, uncond: dict | None,
                       evaluation_batch: int) -> dict[str, dict[str, list[float]]]:
    """Seconds to sample (and decode) the first b evaluation samples at each b of SPEED_BATCHES under
    the evaluation batch, SPEED_REPEATS times, the three methods in turn within a repeat and the
    first one rotating between repeats. One warm-up call of each method goes untimed."""
    timings = {}
    for batch in (b for b in SPEED_BATCHES if b < evaluation_batch):
        small = ImageSampler(base, {k: v[:batch] for k, v in sampler.conditions.items()}, sampler.seeds[:batch],
                             sampler.steps, batch, sampler.scheduler)
        methods = {"cfg": CFG(base, w, uncond, adapted.guidance_interval), "agd": AGD(adapted, w),
                   "unguided": Unguided(base)}
        small.run_interleaved(list(methods.values()))  # warm-up
        seconds = {m: [] for m in methods}
        names = list(methods)
        for repeat in range(SPEED_REPEATS):
            order = names[repeat % 3:] + names[:repeat % 3]
            for name, (_, spent) in zip(order, small.run_interleaved([methods[m] for m in order])):
                seconds[name].append(spent)
        timings[str(batch)] = seconds
    return timings


def _prompt_ids(base, n: int, per_prompt: int) -> np.ndarray:
    """The cluster of each sample for the bootstrap: its prompt for text models (the samples of one
    prompt are ``per_prompt`` consecutive rows); each sample alone for class models."""
    if base.conditioning == "text":
        return np.arange(n) // per_prompt
    return np.arange(n)


def write_evidence(out: Path, judges: Judges, unguided_judged, judged: dict, samples_dir: Path, in_range: list[float],
                   tolerance: float, prompt_ids: np.ndarray) -> dict | None:
    """The per-sample files (outcomes.csv, features.npz; real checkpoints: real_outcomes.csv and the
    Inception features) and the intervals computed from them (:mod:`agd_pipeline.evidence`); None
    where there is neither a judge with labels to score against nor a real-model metric."""
    rows, features = [], {}
    if unguided_judged is not None:
        rows = judge_rows(judges.labels.numpy(), unguided_judged, judged, prompt_ids)
        evidence.write_outcomes(out / evidence.OUTCOMES, rows)
        if judges.fid is not None and judges.has_real:
            folders = {"real": judges.real_dir, "unguided": samples_dir / "unguided",
                       **{evidence.feature_key(method, w): samples_dir / method / f"w{w:g}"
                          for w in judged for method in ("cfg", "agd")}}
            features = {key: judges.fid.features(folder) for key, folder in folders.items()}
            if judges.second_fid is not None:  # the same sample sets in the second judge's features
                folders["real"] = judges.second_real_dir
                features.update({evidence.SECOND_JUDGE_PREFIX + key: judges.second_fid.features(folder)
                                 for key, folder in folders.items()})
    else:
        (out / evidence.OUTCOMES).unlink(missing_ok=True)  # none from an earlier run in this folder
    real_rows = judges.real_rows(prompt_ids)
    if real_rows:
        evidence.write_outcomes(out / evidence.REAL_OUTCOMES, real_rows, evidence.REAL_COLUMNS)
        real_rows = evidence.read_outcomes(out / evidence.REAL_OUTCOMES, evidence.REAL_COLUMNS)  # as --check reads them
        features.update(judges.inception_arrays())
    else:
        (out / evidence.REAL_OUTCOMES).unlink(missing_ok=True)
    if features:
        features = {k: np.asarray(v, dtype=np.float32) for k, v in features.items()}
        np.savez_compressed(out / evidence.FEATURES, **features)
    else:
        (out / evidence.FEATURES).unlink(missing_ok=True)
    if not rows and not real_rows:
        return None
    return evidence.assess(rows, features, in_range, tolerance, real_rows=real_rows or None)


def judge_rows(labels: np.ndarray, unguided_judged, judged: dict, prompt_ids: np.ndarray) -> list[dict]:
    """The rows of outcomes.csv: per sample, method and w, the class each judge saw."""
    rows = []

    def add(method: str, w, classes) -> None:
        first, second = classes
        for i, c in enumerate(first):
            rows.append({"sample": i, "prompt": int(prompt_ids[i]), "label": int(labels[i]), "method": method, "w": w,
                         "judged": int(c), "correct": int(c == labels[i]),
                         **({"judged2": int(second[i]), "correct2": int(second[i] == labels[i])}
                            if second is not None else {})})

    add("unguided", None, unguided_judged)
    for w, classes in judged.items():
        add("cfg", w, classes["cfg"])
        add("agd", w, classes["agd"])
    return rows


def summarise(assessed: dict | None, speed: dict) -> dict:
    """The in-range summary in flat numbers (what `dvc exp show` lists): each claim's point estimate
    beside the bound it is judged on, and ``targets_met`` from the bounds
    (:mod:`agd_pipeline.evidence` defines the targets)."""
    main = speed["per_batch"][speed["evaluation_batch"]]["speed_ratio_agd_over_cfg"]
    summary = {"speed_ratio_agd_over_cfg": main["median"], "speed_ratio_min": main["min"]}
    if assessed is None or "summary" not in assessed:  # no judge (a real checkpoint): no quality targets
        return summary
    evid = assessed["summary"]
    summary.update({
        "max_accuracy_drop_points": evid["max_accuracy_drop_points"]["point"],
        "max_accuracy_drop_points_high": evid["max_accuracy_drop_points"]["high"],
        "guidance_recovered": evid["guidance_recovered"]["point"],
        "guidance_recovered_low": evid["guidance_recovered"]["low"]})
    if "max_fidelity_ratio" in evid:
        summary.update({
            "fid_ratio_low": evid["fid_ratio_agd_over_cfg"]["low"],
            "fid_ratio_high": evid["fid_ratio_agd_over_cfg"]["high"],
            "max_fidelity_ratio": evid["max_fidelity_ratio"]["point"],
            "max_fidelity_ratio_high": evid["max_fidelity_ratio"]["high"]})
    targets = [*evid["targets"].values(), speed["target"]]
    if "negative" in assessed:
        ratio = assessed["negative"]["avoidance_ratio_agd_over_cfg"]
        summary["negative_avoidance_ratio"], summary["negative_avoidance_ratio_low"] = ratio["point"], ratio["low"]
        targets.append(assessed["negative"]["target"])
    summary["targets_met"] = all(t["met"] for t in targets)
    return summary


def _write_csv(path: Path, rows: list[dict], columns: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["w", *columns])
        for r in rows:
            writer.writerow([r["w"], *(_fmt(r[key]) for key in columns.values())])


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6g}"


def paired_rmse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the RMSE between each image and the one from the same seed."""
    return float(((images - reference) ** 2).flatten(1).mean(1).sqrt().mean())


def format_table(rows: list[dict]) -> str:
    return results_table(rows) + "\n(* outside the training range of w)"



def _require_class_model(base, what: str) -> None:
    if base.conditioning != "class":
        raise ConfigError(
            f"{what} measures class-conditional models (FID and accuracy per class, classes cycled); "
            f"{base.model_id!r} is a text-to-image {base.family} model. Compare AGD with CFG on it with "
            f"`{command_line('sample')} --prompts-file ...` and again with `--cfg`."
        )


@torch.no_grad()
def gap_closed(adapters: str | Path, num_trajectories: int = 400, seed: int = 999, steps: int = 0,
               device: str = "cpu", adapted=None, scheduler: str = "", conditions: dict | None = None,
               uncond: dict | None = None) -> dict:
    """Share of the per-step gap between the conditional and the CFG output that AGD removes.

    On fresh CFG trajectories (new seeds, w ~ U[training range], classes cycled): the sum over steps
    of |AGD - CFG|^2 against |cond - CFG|^2, overall and per unit bin of w. 1 = CFG, 0 = unguided.
    ``scheduler`` names another sampler than the recorded one (as evaluate.scheduler does). Text
    models need ``conditions`` (condition rows, e.g. evaluate's prompts; cycled like the classes,
    with the negative prompt's rows where the adapters read it) and CFG's ``uncond``.
    """
    from .generation import trajectory_plan

    config = read_adapter_config(adapters)
    adapted = adapted if adapted is not None else load_adapted_model(adapters, device=device)
    base = adapted.base
    w_min, w_max = config["guidance"]["min"], config["guidance"]["max"]
    if base.conditioning == "text" and conditions is not None:
        rows = len(next(iter(conditions.values())))
        plan = trajectory_plan(seed, range(num_trajectories), list(range(rows)), w_min, w_max, key="prompt_index")
        index = torch.from_numpy(plan["prompt_index"])
        cond = {name: value[index].to(base.device) for name, value in conditions.items()}
    else:
        _require_class_model(base, "gap-closed")
        plan = trajectory_plan(seed, range(num_trajectories), list(range(base.num_classes)), w_min, w_max)
        cond = base.class_condition(torch.from_numpy(plan["class_label"]).to(base.device))
    gens = generators_for(plan["seed"].tolist())
    w = torch.from_numpy(plan["guidance_scale"]).to(base.device)
    err_agd = torch.zeros(num_trajectories)
    err_cond = torch.zeros(num_trajectories)

    def observe(step):
        out = base.prediction_channels(adapted(step.model_input, step.timestep, cond, w))
        err_agd.add_(((out - step.guided_output) ** 2).flatten(1).mean(1).cpu())
        err_cond.add_(((step.cond_output - step.guided_output) ** 2).flatten(1).mean(1).cpu())

    sample(base, cond, initial_noise(base, gens), steps or config["sampler"]["num_steps"],
           CFG(base, w, uncond, interval=adapted.guidance_interval),
           scheduler=scheduler_for(base, config.get("sampler"), scheduler), generators=gens, observer=observe)
    edges = np.arange(np.floor(w_min), np.ceil(w_max) + 1)
    w_cpu = w.cpu()
    bins = {}
    for lo, hi in zip(edges, edges[1:]):
        mask = (w_cpu >= lo) & (w_cpu < hi)
        if mask.any():
            bins[f"[{lo:g},{hi:g})"] = float(1 - err_agd[mask].sum() / err_cond[mask].sum())
    return {"adapters": str(adapters), "overall": float(1 - err_agd.sum() / err_cond.sum()),
            "per_w_bin": bins, "trajectories": num_trajectories, "seed": seed}
