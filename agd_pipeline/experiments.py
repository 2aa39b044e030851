"""The paper's claims as DVC experiments: each experiment is a few variants of the default pipeline
(``dvc.yaml``), each variant one ``dvc exp run --temp`` with ``--set-param`` overrides, so every run
is a DVC experiment with its params and metrics (``dvc exp show``). The runs execute in DVC's
temporary copies of the repository and share its cache. Before them, ``dvc repro`` brings the
pipeline's default outputs up to date in the workspace (a no-op when they are), so stages whose
inputs a variant does not change (the base model) run at most once, even in a fresh clone.

After the runs, the experiment's table (each variant's summary metrics from ``dvc exp show --json``)
is written to ``docs/experiments/<name>/results.csv`` and ``results.md`` and its plot to
``docs/experiments/<name>/plot.png``, all tracked by git; README's block ``experiment-<name>`` is rendered
from them (``python -m stages.experiments report NAME``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .interrupts import signals_as_interrupts
from .errors import AgdError, ConfigError, os_reason, require

EXPERIMENTS_DIR = Path("docs/experiments")
SUMMARY_FILE = "summary.json"  # evaluate's DVC metrics file (agd_pipeline.evaluation.SUMMARY)
DEFAULT_SUMMARY = f"data/eval/{SUMMARY_FILE}"  # the default pipeline's


@dataclass(frozen=True)
class Variant:
    name: str
    label: str  # what the table and plot call it
    params: dict = field(default_factory=dict)  # dotted params.yaml key -> value (dvc exp run -S)
    group: str = ""  # curve plots: variants of one group are joined by a line
    run: str = ""  # the DVC experiment it reads (empty: its own); variants of one run share its params
    summary: str = DEFAULT_SUMMARY  # the summary.json (path in the repository) its row comes from


@dataclass(frozen=True)
class Column:
    key: str  # a key of summary.json
    header: str
    spec: str = ".3f"
    # the summary key of the 95 % bound the target is judged on (``..._high``: an upper bound,
    # ``..._low``: a lower one), printed after the point; optional in a results.csv written before
    bound: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    question: str
    variants: tuple[Variant, ...]
    columns: tuple[Column, ...]
    plot: tuple[str, ...]  # summary keys, one panel each: bars per variant, or curves against ``x``
    row_header: str = "data"  # what the table's first column names
    x: str = ""  # a summary key: the panels draw each plot key against it (one line per variant group)
    log_x: bool = False
    pipeline: str = "dvc.yaml"  # what `dvc exp run` reproduces
    prepare: str = ""  # what `dvc repro` brings up to date before the variants (empty: told from their params)

    def run_name(self, variant: Variant) -> str:
        return f"{self.name}-{variant.run or variant.name}"

    def runs(self) -> dict[str, dict]:
        """{DVC experiment name: its params}, in order; variants that share a run must agree on them.
        Every run evaluates on the validation split: experiments decide, so they never see the test
        split (the pipelines without a -S key for it hold ``split: validation`` in their params file)."""
        runs: dict[str, dict] = {}
        for variant in self.variants:
            if any(key.rpartition(":")[2] == "evaluate.split" for key in variant.params):
                raise ConfigError(f"experiment {self.name}: variant {variant.name!r} sets evaluate.split; experiments "
                                  "take decisions, so they evaluate on the validation split only")
            name = self.run_name(variant)
            params = {**variant.params, **VALIDATION_SPLIT.get(self.pipeline, {})}
            if runs.setdefault(name, params) != params:
                raise ConfigError(f"experiment {self.name}: variants of run {name!r} set different params")
        return runs


# the two in-range worst cases every experiment reports, each with the 95 % bound its target is judged on
_FIDELITY = Column("max_fidelity_ratio", "FID(AGD,CFG) / FID(unguided,CFG)", bound="max_fidelity_ratio_high")
_DROP = Column("max_accuracy_drop_points", "max acc drop (points)", ".1f", bound="max_accuracy_drop_points_high")

SUMMARY_COLUMNS = (
    Column("gap_closed", "gap closed"),
    Column("mean_accuracy_agd", "acc AGD"),
    Column("mean_accuracy_cfg", "acc CFG"),
    _DROP,
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("mean_fid_cfg", "FID CFG", ".2f"),
    _FIDELITY,
    Column("mean_rmse_to_cfg_agd", "RMSE AGD-CFG", ".3f"),
)

# the default adapters' settings, spelled out so each size variant states what it trains
_SIZE = {"train.adapter": "bottleneck", "train.placement": "attention+output", "train.width": 32,
         "train.embed_dim": 64}

# the baselines the paper's comparisons lose to, and the small learning-rate/steps sweep each gets
_BASELINES = (
    ("offset-e16", "offset e16", {**_SIZE, "train.adapter": "offset", "train.embed_dim": 16}),
    ("cross-attention-w8", "cross-attention w8 e16",
     {**_SIZE, "train.adapter": "cross_attention", "train.width": 8, "train.embed_dim": 16}),
    ("forward-noised", "forward-noised data",
     {**_SIZE, "generate.source": "forward_noised", "generate.real_data": "pretrained/toy-dit/train.npz"}),
)
_SWEEP = (
    ("lr0.001", "lr 0.001, 1,500 steps", {"train.learning_rate": 0.001, "train.steps": 1500}),
    ("lr0.003", "lr 0.003, 1,500 steps", {"train.learning_rate": 0.003, "train.steps": 1500}),
    ("lr0.01", "lr 0.01, 1,500 steps", {"train.learning_rate": 0.01, "train.steps": 1500}),
    ("lr0.003-steps3000", "lr 0.003, 3,000 steps", {"train.learning_rate": 0.003, "train.steps": 3000}),
)

# the SD3 text-to-image default's pipeline stage, params file and summary (pipelines/text/)
_SD3, _SD3_SUMMARY = "pipelines/text/sd3.yaml", "data/text/sd3/eval/summary.json"
_SD3_PIPELINE = "pipelines/text/dvc.yaml:evaluate@sd3"
# the -S override that puts a pipeline's evaluation on the validation split (its params file reports on test)
VALIDATION_SPLIT = {"dvc.yaml": {"evaluate.split": "validation"},
                    _SD3_PIPELINE: {f"{_SD3}:evaluate.split": "validation"}}
# the SD3 derivatives' fine-tunes (pipelines/derivatives-sd3/params.yaml): a full one at a lower learning rate
_SD3_DERIVED = {mode: {f"pipelines/derivatives-sd3/params.yaml:finetune.{key}": value for key, value in
                       (("mode", mode), ("learning_rate", 0.0005 if mode == "full" else 0.002))}
                for mode in ("full", "lora")}

# the guidance-interval experiments' table (class default and SD3)
_INTERVAL_COLUMNS = (
    Column("mean_fid_cfg", "FID CFG", ".2f"),
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("mean_accuracy_cfg", "acc CFG"),
    Column("mean_accuracy_agd", "acc AGD"),
    Column("gap_closed", "gap closed"),
    _FIDELITY,
    Column("speed_ratio_agd_over_cfg", "AGD / CFG images/s", ".2f"),
)

# the unseen-w experiments' table (class default and SD3)
_UNSEEN_COLUMNS = (
    Column("max_fidelity_ratio", "in range: FID(AGD,CFG) / FID(unguided,CFG)", bound="max_fidelity_ratio_high"),
    Column("outside_max_fidelity_ratio", "unseen w: FID(AGD,CFG) / FID(unguided,CFG)"),
    Column("max_accuracy_drop_points", "in range: max acc drop (points)", ".1f",
           bound="max_accuracy_drop_points_high"),
    Column("outside_max_accuracy_drop_points", "unseen w: max acc drop (points)", ".1f"),
    Column("gap_closed", "gap closed (in range)"),
)

# the size experiments' table (class default and SD3)
_SIZE_COLUMNS = (
    Column("adapter_share", "share of base", ".3f"),
    Column("adapter_parameters", "adapter parameters", ",d"),
    Column("gap_closed", "gap closed"),
    _FIDELITY,
    _DROP,
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("speed_ratio_agd_over_cfg", "AGD / CFG images/s", ".2f"),
)
# the class experiment's, re-run with the guidance recovered in its summary
_SIZE_COLUMNS_RECOVERED = (*_SIZE_COLUMNS[:5],
                           Column("guidance_recovered", "guidance recovered", bound="guidance_recovered_low"),
                           *_SIZE_COLUMNS[5:])

# what the SD3 experiments' tables show after their first column (distance to CFG, accuracy, FID)
_TEXT_QUALITY_COLUMNS = (
    _FIDELITY,
    _DROP,
    Column("mean_accuracy_agd", "acc AGD"),
    Column("mean_accuracy_cfg", "acc CFG"),
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("mean_fid_cfg", "FID CFG", ".2f"),
)

# the baseline sweep's table
_SWEEP_COLUMNS = (
    Column("gap_closed", "gap closed"),
    _FIDELITY,
    _DROP,
    Column("guidance_recovered", "guidance recovered", bound="guidance_recovered_low"),
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("mean_fid_cfg", "FID CFG", ".2f"),
)

# the data-scaling experiments' table (class default and SD3)
_DATA_COLUMNS = (
    Column("training_pairs", "(x, t, w) pairs", ",d"),
    Column("store_megabytes", "store MB", ".1f"),
    Column("gap_closed", "gap closed"),
    _FIDELITY,
    _DROP,
    Column("mean_fid_agd", "FID AGD", ".2f"),
    Column("mean_fid_cfg", "FID CFG", ".2f"),
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
            Variant("forward-noised", "forward-noised real data",
                    {"generate.source": "forward_noised", "generate.real_data": "pretrained/toy-dit/train.npz"}),
        ),
        columns=SUMMARY_COLUMNS,
        plot=("gap_closed", "mean_fid_agd", "max_fidelity_ratio"),
    ),
    "trajectories-vs-forward-noised-sd3": Experiment(
        name="trajectories-vs-forward-noised-sd3",
        title="SD3 default: trajectories vs forward-noised data",
        question=("The central ablation on the SD3 text-to-image default (flow matching): adapters trained on the "
                  "1,500 training prompts' CFG trajectories, or on the images those prompts caption noised along "
                  "flow matching's path (standard guidance distillation), the same prompts, negative prompts, w and "
                  "number of (x, t, w) pairs, both labelled with CFG's output (accuracy: the prompt's digit)."),
        variants=(
            Variant("trajectories", "CFG trajectories (AGD)",
                    {f"{_SD3}:generate.source": "trajectories", f"{_SD3}:generate.real_data": ""},
                    summary=_SD3_SUMMARY),
            Variant("forward-noised", "forward-noised real data",
                    {f"{_SD3}:generate.source": "forward_noised",
                     f"{_SD3}:generate.real_data": "pretrained/text-sd3/train.npz"},
                    summary=_SD3_SUMMARY),
        ),
        columns=SUMMARY_COLUMNS,
        plot=("gap_closed", "mean_fid_agd", "max_fidelity_ratio"),
        pipeline=_SD3_PIPELINE,
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
        columns=_UNSEEN_COLUMNS,
        plot=("max_fidelity_ratio", "outside_max_fidelity_ratio", "outside_max_accuracy_drop_points"),
        row_header="adapters trained on",
    ),
    "unseen-w-sd3": Experiment(
        name="unseen-w-sd3",
        title="SD3 default: guidance scales outside the training range",
        question=("The same question on the SD3 text-to-image default: adapters trained on U[1, 3] and evaluated "
                  "up to w = 8, and the default's, trained on U[1, 5], evaluated up to w = 9 (accuracy: the "
                  "prompt's digit, 300 held-out prompts)."),
        variants=(
            Variant("train-1-3", "U[1, 3] (unseen: 4, 6, 8)",
                    {f"{_SD3}:generate.guidance_max": 3.0,
                     f"{_SD3}:evaluate.guidance_scales": [2.0, 3.0, 4.0, 6.0, 8.0]},
                    summary=_SD3_SUMMARY),
            Variant("train-1-5", "U[1, 5] (default; unseen: 7, 9)",
                    {f"{_SD3}:generate.guidance_max": 5.0,
                     f"{_SD3}:evaluate.guidance_scales": [2.0, 3.0, 4.0, 5.0, 7.0, 9.0]},
                    summary=_SD3_SUMMARY),
        ),
        columns=_UNSEEN_COLUMNS,
        plot=("max_fidelity_ratio", "outside_max_fidelity_ratio", "outside_max_accuracy_drop_points"),
        row_header="adapters trained on",
        pipeline=_SD3_PIPELINE,
    ),
    "size-and-placement": Experiment(
        name="size-and-placement",
        title="Adapter size and placement",
        question=("What a share of the base's parameters buys: bottleneck adapters of growing width (and "
                  "condition-embedding width) at the default placement, and at about 2 % of the base the other "
                  "placements and kinds, against gap closed and distance to CFG."),
        variants=(
            Variant("bottleneck-w4", "bottleneck, width 4, embed 16", {**_SIZE, "train.width": 4,
                                                                       "train.embed_dim": 16}, "bottleneck"),
            Variant("bottleneck-w8", "bottleneck, width 8, embed 16", {**_SIZE, "train.width": 8,
                                                                       "train.embed_dim": 16}, "bottleneck"),
            Variant("bottleneck-w16", "bottleneck, width 16, embed 32", {**_SIZE, "train.width": 16,
                                                                         "train.embed_dim": 32}, "bottleneck"),
            Variant("bottleneck-w32", "bottleneck, width 32, embed 64 (default)", _SIZE, "bottleneck"),
            Variant("bottleneck-w64", "bottleneck, width 64, embed 64", {**_SIZE, "train.width": 64}, "bottleneck"),
            Variant("attention-only-w8", "bottleneck w8 e16, attention only (no output layer)",
                    {**_SIZE, "train.width": 8, "train.embed_dim": 16, "train.placement": "attention"}),
            Variant("block-output-w8", "bottleneck w8 e16, whole blocks + output",
                    {**_SIZE, "train.width": 8, "train.embed_dim": 16, "train.placement": "block+output"}),
            Variant("offset-e16", "offset (no token path), embed 16",
                    {**_SIZE, "train.adapter": "offset", "train.embed_dim": 16}),
            Variant("cross-attention-w8", "cross-attention w8 e16",
                    {**_SIZE, "train.adapter": "cross_attention", "train.width": 8, "train.embed_dim": 16}),
            # the two placements at 2 % that one seed cannot separate, each with two more training seeds
            *(Variant(f"{name}-seed{seed}", f"{label}, train.seed {seed}",
                      {**_SIZE, "train.width": 8, "train.embed_dim": 16, "train.placement": placement,
                       "train.seed": seed}, f"{name}, seeds 0-2")
              for name, label, placement in (("bottleneck-w8", "bottleneck, width 8, embed 16", "attention+output"),
                                             ("block-output-w8", "bottleneck w8 e16, whole blocks + output",
                                              "block+output"))
              for seed in (1, 2)),
        ),
        columns=_SIZE_COLUMNS_RECOVERED,
        plot=("gap_closed", "max_fidelity_ratio"),
        row_header="adapters",
        x="adapter_share",
        log_x=True,
    ),
    "baseline-sweep": Experiment(
        name="baseline-sweep",
        title="The baselines' own learning rate and steps",
        question=("Whether the baselines lose to the default's adapters only for want of tuning: the offset "
                  "adapter (embed 16), cross-attention adapters (width 8, embed 16) and adapters trained on "
                  "forward-noised real data (the default's adapters) each at learning rates 0.001, 0.003 (the "
                  "bottleneck's) and 0.01 for 1,500 steps, and at 0.003 for 3,000 steps, on the validation split."),
        variants=tuple(
            Variant(f"{name}-{tag}", f"{label}, {setting}", {**params, **schedule}, label)
            for name, label, params in _BASELINES
            for tag, setting, schedule in _SWEEP),
        columns=_SWEEP_COLUMNS,
        plot=("gap_closed", "max_fidelity_ratio", "max_accuracy_drop_points"),
        row_header="baseline, training",
        prepare="dvc.yaml:generate",  # the default store, which the offset and cross-attention rows train on
    ),
    "size-and-placement-sd3": Experiment(
        name="size-and-placement-sd3",
        title="SD3 default: adapter size",
        question=("The size question on the SD3 text-to-image default: bottleneck adapters at its placement (every "
                  "joint attention and the output projection) of width 8 with a 16-wide condition embedding, about "
                  "2 % of the base (the paper's share), against the default's width 32 and embedding 64 (12 %)."),
        variants=(
            Variant("bottleneck-w8", "bottleneck, width 8, embed 16",
                    {f"{_SD3}:train.width": 8, f"{_SD3}:train.embed_dim": 16}, "bottleneck", summary=_SD3_SUMMARY),
            Variant("bottleneck-w32", "bottleneck, width 32, embed 64 (default)",
                    {f"{_SD3}:train.width": 32, f"{_SD3}:train.embed_dim": 64}, "bottleneck", summary=_SD3_SUMMARY),
        ),
        columns=_SIZE_COLUMNS,
        plot=("gap_closed", "max_fidelity_ratio", "max_accuracy_drop_points"),
        row_header="adapters",
        x="adapter_share",
        log_x=True,
        pipeline=_SD3_PIPELINE,
    ),
    "data-scaling-sd3": Experiment(
        name="data-scaling-sd3",
        title="SD3 default: data scaling",
        question=("The data question on the SD3 text-to-image default: its 1,500 training prompts with one "
                  "trajectory each (the default) against two each, 24 steps recorded, the same training; against "
                  "gap closed, distance to CFG and store size."),
        variants=tuple(
            Variant(f"per-prompt-{n}", f"{n} per prompt x 24 steps" + (" (default)" if n == 1 else ""),
                    {f"{_SD3}:generate.trajectories_per_prompt": n}, "trajectories per prompt", summary=_SD3_SUMMARY)
            for n in (1, 2)),
        columns=_DATA_COLUMNS,
        plot=("gap_closed", "max_fidelity_ratio"),
        row_header="recorded",
        x="store_megabytes",
        log_x=True,
        pipeline=_SD3_PIPELINE,
    ),
    "data-scaling": Experiment(
        name="data-scaling",
        title="Data scaling",
        question=("How much recorded data the adapters need: trajectories per class at the default 32 steps, "
                  "and the steps recorded per trajectory at the default 200 per class (each evaluated with the "
                  "sampler it was recorded with), against gap closed, distance to CFG and store size."),
        variants=(
            *(Variant(f"per-class-{n}", f"{n} per class x 32 steps",
                      {"generate.trajectories_per_class": n, "generate.num_steps": 32}, "trajectories per class")
              for n in (100, 200, 400)),
            # 25 and 50 per class and 64 steps were dropped to keep a fresh clone's run under 30 minutes (README)
            *(Variant(f"steps-{k}", f"200 per class x {k} steps",
                      {"generate.trajectories_per_class": 200, "generate.num_steps": k}, "steps recorded")
              for k in (16,)),
            # the same 16-step store's adapters sampled with 32 steps, scored against the 32-step CFG
            # reference the per-class rows use: separates less data from a coarser sampler
            Variant("steps-16-scored-32", "200 per class x 16 steps, sampled and scored at 32 steps",
                    {"generate.trajectories_per_class": 200, "generate.num_steps": 16, "evaluate.num_steps": 32}),
        ),
        columns=_DATA_COLUMNS,
        plot=("gap_closed", "max_fidelity_ratio"),
        row_header="recorded",
        x="store_megabytes",
        log_x=True,
    ),
    "fine-tuned-derivatives": Experiment(
        name="fine-tuned-derivatives",
        title="Adapters on fine-tuned derivatives",
        question=("The default base fine-tuned on its boldest third of each digit class, fully (every weight) and "
                  "with a rank-8 LoRA on the attention projections (peft, merged), then on each derivative: the "
                  "default's adapters applied unchanged against adapters retrained on the derivative, both "
                  "measured against the derivative's own CFG (FID against its bold held-out digits)."),
        variants=(
            Variant("original", "original base, default adapters (reference)", run="all"),
            Variant("full-original", "full fine-tune, default adapters unchanged", run="all",
                    summary="data/derived/full/eval-original/summary.json", group="full fine-tune"),
            Variant("full-retrained", "full fine-tune, adapters retrained", run="all",
                    summary="data/derived/full/eval-retrained/summary.json", group="full fine-tune"),
            Variant("lora-original", "LoRA fine-tune, default adapters unchanged", run="all",
                    summary="data/derived/lora/eval-original/summary.json", group="LoRA"),
            Variant("lora-retrained", "LoRA fine-tune, adapters retrained", run="all",
                    summary="data/derived/lora/eval-retrained/summary.json", group="LoRA"),
        ),
        columns=(
            Column("gap_closed", "gap closed"),
            _FIDELITY,
            _DROP,
            Column("mean_fid_agd", "FID AGD", ".2f"),
            Column("mean_fid_cfg", "FID CFG", ".2f"),
            Column("mean_rmse_to_cfg_agd", "RMSE AGD-CFG", ".3f"),
        ),
        plot=("gap_closed", "max_fidelity_ratio"),
        row_header="base and adapters",
        pipeline="pipelines/derivatives/dvc.yaml",
    ),
    "fine-tuned-derivatives-sd3": Experiment(
        name="fine-tuned-derivatives-sd3",
        title="SD3 default: adapters on fine-tuned derivatives",
        question=("The derivatives question on the SD3 text-to-image default: its transformer fine-tuned on the "
                  "training digits captioned bold, fully (every weight) and with a rank-8 LoRA on the attention "
                  "projections (peft, merged); on each derivative the default's adapters applied unchanged against "
                  "adapters retrained on it with the default's settings, both measured against the derivative's "
                  "own CFG (FID against its bold held-out digits; w = 2, 3.5 and 5)."),
        variants=(
            Variant("original", "original SD3 base, default adapters (reference)", run="lora",
                    params=_SD3_DERIVED["lora"], summary=_SD3_SUMMARY),
            *(Variant(f"{mode}-{adapters}", f"{label} fine-tune, "
                      + ("default adapters unchanged" if adapters == "original" else "adapters retrained"),
                      run=mode, params=_SD3_DERIVED[mode], group=f"{label} fine-tune",
                      summary=f"data/derived/sd3/eval-{adapters}/{SUMMARY_FILE}")
              for mode, label in (("full", "full"), ("lora", "LoRA")) for adapters in ("original", "retrained")),
        ),
        columns=(Column("gap_closed", "gap closed"), *_TEXT_QUALITY_COLUMNS),
        plot=("gap_closed", "max_fidelity_ratio"),
        row_header="base and adapters",
        pipeline="pipelines/derivatives-sd3/dvc.yaml",
        prepare=_SD3_PIPELINE,  # the SD3 default whose base is fine-tuned and whose adapters are reused
    ),
    "fewer-steps": Experiment(
        name="fewer-steps",
        title="Sampling with other step counts and samplers than recorded",
        question=("Adapters trained on 32-step DDIM trajectories, sampled with 8, 16 and 50 DDIM steps and with "
                  "other schedulers (DPM-Solver++ and Euler, built from the same training schedule); AGD and CFG "
                  "use the same sampler in each row, and gap closed is measured on that sampler's CFG "
                  "trajectories."),
        variants=(
            *(Variant(f"ddim-{k}", f"DDIM {k} steps" + (" (recorded)" if k == 32 else ""),
                      {"evaluate.num_steps": k, "evaluate.scheduler": ""}, "DDIM (recorded sampler)")
              for k in (8, 16, 32, 50)),
            Variant("dpm-16", "DPM-Solver++ 16 steps",
                    {"evaluate.num_steps": 16, "evaluate.scheduler": "DPMSolverMultistepScheduler"},
                    "DPM-Solver++"),
            Variant("dpm-32", "DPM-Solver++ 32 steps",
                    {"evaluate.num_steps": 32, "evaluate.scheduler": "DPMSolverMultistepScheduler"},
                    "DPM-Solver++"),
            Variant("euler-32", "Euler 32 steps",
                    {"evaluate.num_steps": 32, "evaluate.scheduler": "EulerDiscreteScheduler"}, "Euler"),
        ),
        columns=(
            Column("num_steps", "steps", "d"),
            Column("gap_closed", "gap closed"),
            _FIDELITY,
            _DROP,
            Column("mean_fid_agd", "FID AGD", ".2f"),
            Column("mean_fid_cfg", "FID CFG", ".2f"),
            Column("mean_rmse_to_cfg_agd", "RMSE AGD-CFG", ".3f"),
        ),
        plot=("gap_closed", "max_fidelity_ratio"),
        row_header="sampler",
        x="num_steps",
        log_x=True,
    ),
    "fewer-steps-sd3": Experiment(
        name="fewer-steps-sd3",
        title="SD3 default: other step counts than recorded",
        question=("The same question on the SD3 text-to-image default (flow matching, joint attention): adapters "
                  "trained on 24-step flow-matching Euler trajectories, sampled with 8, 12 and 40 steps; CFG uses "
                  "the same steps in each row, and gap closed is measured on CFG trajectories of that step count "
                  "(accuracy: the prompt's digit, 300 held-out prompts)."),
        variants=tuple(
            Variant(f"euler-{k}", f"flow-matching Euler {k} steps" + (" (recorded)" if k == 24 else ""),
                    {f"{_SD3}:evaluate.num_steps": 0 if k == 24 else k},  # 0: the recorded 24
                    "flow-matching Euler (recorded sampler)",
                    summary=_SD3_SUMMARY)
            for k in (8, 12, 24, 40)),
        columns=(Column("num_steps", "steps", "d"), Column("gap_closed", "gap closed"), *_TEXT_QUALITY_COLUMNS),
        plot=("max_fidelity_ratio", "max_accuracy_drop_points"),
        row_header="sampler",
        x="num_steps",
        log_x=True,
        pipeline=_SD3_PIPELINE,
    ),
    "guidance-interval": Experiment(
        name="guidance-interval",
        title="Distilled guidance interval",
        question=("Beyond the paper: guidance applied on an interval of noise levels only (t / T in [0, 0.4], the "
                  "low-noise end; w = 1 elsewhere), a schedule that improves CFG's FID on this default. AGD with "
                  "the default adapters (distilled from CFG at every step) run on the interval, against adapters "
                  "distilled from trajectories recorded on the interval; CFG uses the same interval in each row."),
        variants=(
            Variant("every-step", "CFG at every step (default adapters)",
                    {"generate.guidance_interval": [], "evaluate.guidance_interval": []}),
            Variant("interval-default-adapters", "interval, adapters from every-step CFG",
                    {"generate.guidance_interval": [], "evaluate.guidance_interval": [0.0, 0.4]}),
            Variant("interval-distilled", "interval, adapters from interval CFG",
                    {"generate.guidance_interval": [0.0, 0.4], "evaluate.guidance_interval": []}),
        ),
        columns=_INTERVAL_COLUMNS,
        plot=("mean_fid_cfg", "mean_fid_agd", "max_fidelity_ratio"),
        row_header="guidance",
    ),
    "guidance-interval-sd3": Experiment(
        name="guidance-interval-sd3",
        title="SD3 default: distilled guidance interval",
        question=("The guidance-interval question on the SD3 text-to-image default: CFG only where sigma lies in "
                  "[0, 0.4] (w = 1 elsewhere), sampled by the default adapters and by adapters distilled from "
                  "trajectories recorded on that interval; CFG uses the same interval in each row."),
        variants=(
            Variant("every-step", "CFG at every step (default adapters)",
                    {f"{_SD3}:generate.guidance_interval": [], f"{_SD3}:evaluate.guidance_interval": []},
                    summary=_SD3_SUMMARY),
            Variant("interval-default-adapters", "interval, adapters from every-step CFG",
                    {f"{_SD3}:generate.guidance_interval": [], f"{_SD3}:evaluate.guidance_interval": [0.0, 0.4]},
                    summary=_SD3_SUMMARY),
            Variant("interval-distilled", "interval, adapters from interval CFG",
                    {f"{_SD3}:generate.guidance_interval": [0.0, 0.4], f"{_SD3}:evaluate.guidance_interval": []},
                    summary=_SD3_SUMMARY),
        ),
        columns=_INTERVAL_COLUMNS,
        plot=("mean_fid_cfg", "mean_fid_agd", "max_fidelity_ratio"),
        row_header="guidance",
        pipeline=_SD3_PIPELINE,
    ),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def _param_value(value) -> str:
    """A -S value DVC parses back to the same YAML value (strings quoted, lists as YAML)."""
    return json.dumps(value)


def run_commands(experiment: Experiment, queue: bool = False) -> list[list[str]]:
    """The ``dvc exp run`` command of each variant, in order: run at once in a temporary copy
    (``--temp``), or put in DVC's queue (``--queue``) for :func:`run` to run several at a time."""
    commands = []
    for name, params in experiment.runs().items():
        sets = [arg for key, value in params.items() for arg in ("-S", f"{key}={_param_value(value)}")]
        commands.append(["dvc", "exp", "run", "--queue" if queue else "--temp", "-n", name, *sets,
                         experiment.pipeline])
    return commands


# The sections of a pipeline's params file are read by the stages of the same name, in this order
# (dvc.yaml: generate -> train -> evaluate from the shipped base; pipelines/text/dvc.yaml the same per
# family). The bases' recipes are a pipeline of their own (pipelines/bases/dvc.yaml) no variant runs.
STAGE_ORDER = ("generate", "train", "evaluate")


def prepare_command(experiment: Experiment) -> list[str] | None:
    """``dvc repro`` in the workspace, before the variants: of the stages no variant's params reach
    (those before the first stage whose section a variant sets), or, where that cannot be told, of
    the whole pipeline; None where the variants change the first stage (nothing is shared but the
    shipped base).

    A variant's copy starts from the workspace's dvc.lock and restores a stage's outputs from the
    shared cache only under the hashes that lock names (DVC's run cache is not consulted for a stage
    whose lock entry matches). In a fresh clone the cache is empty, so without this step every
    variant would train the base model again; with it, the shared stages run once (or are found up
    to date in seconds) and each variant re-runs only the stages its params reach, several variants
    at a time. The default's own row is then one of the variants, run like the others.
    """
    if experiment.prepare:
        return ["dvc", "repro", experiment.prepare]
    file, colon, target = experiment.pipeline.rpartition(":")
    file = file if colon else experiment.pipeline
    sections = {key.rpartition(":")[2].split(".")[0] for variant in experiment.variants for key in variant.params}
    if not sections or not sections <= set(STAGE_ORDER):
        return ["dvc", "repro", experiment.pipeline]
    if min(map(STAGE_ORDER.index, sections)) == 0:
        return None
    stage = STAGE_ORDER[min(map(STAGE_ORDER.index, sections)) - 1]
    item = target.partition("@")[2] if colon else ""
    return ["dvc", "repro", f"{file}:{stage}" + (f"@{item}" if item else "")]


POLL_SECONDS = 15
POLL_COST_FACTOR = 9  # the wait between polls is at least this many times the last poll's time


# Inside: SIGTERM and SIGHUP raise agd_pipeline.cli.Interrupted (a KeyboardInterrupt), so the same clean-up
# runs as for Ctrl-C: the running command's process group is stopped (:func:`run_in_group`) and the
# queue's workers, which are not this process's children, too. Every stage's main runs inside it.
terminate_as_interrupt = signals_as_interrupts


GRACE_SECONDS = 20  # an interrupted command's group gets SIGINT, then SIGKILL after this long


def run_in_group(command: list[str], capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the command in a process group of its own. Interrupted (Ctrl-C, or SIGTERM
    inside :func:`terminate_as_interrupt`), the whole group gets SIGINT, as a terminal gives it, and
    SIGKILL after GRACE_SECONDS (a background job ignores SIGINT) or at a second interrupt: `dvc repro`
    and the stage it runs stop together, where ``subprocess.run`` would SIGKILL dvc alone and leave its
    stage running unseen."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The stop signals wait (blocked) from before the child exists until the `try` that stops its group
    # is entered: a signal that lands between Popen's return and the `try` would otherwise leave the
    # child running (Popen's own exit waits for it), which a loaded machine made happen in the tests.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        process = subprocess.Popen(command, start_new_session=True, preexec_fn=_interruptible_child, **kwargs)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    with process:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal pending since Popen is handled here
            stdout, stderr = process.communicate()
        except BaseException:
            _stop_group(process)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interruptible_child() -> None:
    """In the child, before it runs the command: SIGINT back to its default, and the stop signals
    unblocked (the parent blocks them while it starts the child). A process started in the
    background (``nohup ... &``, CI runners) inherits SIGINT ignored, and its children would then
    ignore the SIGINT that :func:`_stop_group` sends and last the whole grace period."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: wait no longer
        process.wait(GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):  # what is left of the group: the stage under a dead dvc, say
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run(experiment: Experiment, log=print, runner=run_in_group, jobs: int = 1, sleep=None) -> None:
    """Run the shared stages in the workspace (:func:`prepare_command`), then every variant as a DVC
    experiment, replacing earlier runs of the same name: one after the other in temporary copies
    (``jobs`` 1), or queued and run ``jobs`` at a time by DVC's queue workers (each stage runs one
    torch thread, so one job per core uses the machine)."""
    sleep = sleep or time.sleep
    names = list(experiment.runs())
    existing = set(_experiment_rows(show_json(runner, names)))
    stale = [name for name in names if name in existing]
    if stale:
        log(f"replacing earlier runs: {', '.join(stale)}")
        _check(runner(["dvc", "exp", "remove", *stale], capture_output=True, text=True), "dvc exp remove")
    jobs = max(1, min(jobs, len(names)))
    if jobs > 1:  # failed or unstarted queue entries of these names, from an earlier try (none: DVC says so)
        runner(["dvc", "queue", "remove", *names], capture_output=True, text=True)
    commands = [prepare_command(experiment), *run_commands(experiment, queue=jobs > 1)]
    for command in filter(None, commands):
        log("$ " + shlex.join(command))
        result = runner(command, text=True)
        if result.returncode != 0:
            raise AgdError(f"{shlex.join(command)} failed (exit {result.returncode}); its output is above. "
                           "Fix the cause and run the same command again: finished variants are replaced.")
    if jobs == 1:
        return
    start = ["dvc", "queue", "start", "--jobs", str(jobs)]
    log("$ " + " ".join(start))
    # the workers it starts inherit its output: to a pipe, reading it would wait for them to finish
    with tempfile.TemporaryFile("w+") as errors:
        started = runner(start, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        if started.returncode != 0:
            errors.seek(0)
            raise AgdError(f"dvc queue start failed (exit {started.returncode}): {errors.read().strip()[-2000:]}")
    def restart() -> None:  # quiet when every worker is up (busy with other runs in the queue, say)
        with tempfile.TemporaryFile("w+") as output:
            runner(start, stdout=output, stderr=subprocess.STDOUT, text=True)
            output.seek(0)
            said = re.search(r"Started '(\d+)'", output.read())
        if said is None or int(said.group(1)) > 0:
            log("$ " + " ".join(start) + "   (runs left queued with a worker missing: started again)")

    try:
        _wait_for_queue(names, runner, log, sleep, restart, jobs)
    except KeyboardInterrupt:  # the queue's workers are not this process's children: stop them too
        runner(["dvc", "queue", "kill", *names], capture_output=True, text=True)
        runner(["dvc", "queue", "stop"], capture_output=True, text=True)
        raise
    except AgdError:  # a failed run: the others finish, nothing new starts
        runner(["dvc", "queue", "stop"], capture_output=True, text=True)
        raise
    # finished: the workers leave by themselves once the queue is empty (no `dvc queue stop` needed)


SHOW_RETRIES = 8  # consecutive failed `dvc exp show` calls while waiting before giving up (2 minutes)


def _wait_for_queue(names: list[str], runner, log, sleep, restart=None, jobs: int = 1) -> None:
    """Until every named run has left DVC's queue; a failed run stops it with its log's path. A
    ``dvc exp show`` that fails while the queue's workers set up or clear their temporary copies
    (DVC reads a copy's folder as it is removed: "directory '.dvc/tmp/exps/tmp.../.dvc' does not
    exist") is asked again at the next poll; only SHOW_RETRIES failures in a row stop the wait.
    When runs are left queued and fewer than ``jobs`` of them run for two polls in a row, a worker has
    gone: ``restart`` starts the missing ones again (``dvc queue start`` skips the workers that are
    up). Seen here twice: a worker logged "Got shutdown from remote" a few milliseconds after it
    took its first task, ran that task to its end and left; once both did (two runs left queued with
    no worker), once one did (the other ran the rest one at a time). DVC's trackers know workers that
    stop early with runs still queued (treeverse/dvc#10562, treeverse/dvc-task#77); a scratch
    repository did not reproduce it."""
    waiting, failures, short = None, 0, 0
    while True:
        asked = time.monotonic()
        try:
            shown = show_json(runner, names)
        except AgdError as err:
            failures += 1
            if failures >= SHOW_RETRIES:
                raise AgdError(f"{err} ({failures} times in a row while waiting for the queue; the runs go "
                               "on: `dvc queue status`, then `python -m stages.experiments report NAME`)") from None
            log(f"dvc exp show failed, asking again in {POLL_SECONDS} s: {str(err)[-300:]}")
            sleep(POLL_SECONDS)
            continue
        failures = 0
        states = _run_states(shown, names)
        failed = [name for name in names if states.get(name, {}).get("state") == "failed"]
        if failed:
            logs = ", ".join(f"{name}: {states[name].get('log') or 'dvc queue logs ' + name}" for name in failed)
            raise AgdError(f"experiment runs failed ({logs}). Fix the cause and run the same command again: "
                           "finished variants are replaced.")
        left = [name for name in names if states.get(name, {}).get("state") not in ("success", "done")]
        if not left:
            return
        running = sum(states.get(name, {}).get("state") == "running" for name in names)
        short = short + 1 if running < min(jobs, len(left)) else 0
        if short >= 2 and restart is not None:
            restart()
            short = 0
        if left != waiting:
            log(f"waiting for {len(left)} of {len(names)} runs: {', '.join(left)} (dvc queue status; "
                "dvc queue logs NAME)")
            waiting = left
        # `dvc exp show` of a busy queue takes tens of seconds of a core the runs need: poll at most
        # about a tenth of the time (measured here: 20 s a call with two runs on 2 cores)
        sleep(max(POLL_SECONDS, POLL_COST_FACTOR * (time.monotonic() - asked)))


def _run_states(shown, names: list[str]) -> dict[str, dict]:
    """{run name: {"state": queued / running / success / failed, "log": path}} of the named runs in
    ``dvc exp show --json``, as DVC's queue reports them. A killed ``--temp`` run of the same name
    (listed as running for ever, executor "tempdir") is not the queue's and is passed over."""
    states: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            name, executor = node.get("name"), node.get("executor")
            leftover = isinstance(executor, dict) and executor.get("name") == "tempdir"
            if name in names and name not in states and not leftover and (node.get("revs") or node.get("data")):
                if isinstance(executor, dict):
                    local = executor.get("local") or {}
                    states[name] = {"state": executor.get("state"), "log": local.get("log")}
                elif node.get("rev") != "workspace":
                    states[name] = {"state": "done"}
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(shown)
    return states


def show_json(runner=run_in_group, names: list[str] | None = None, tries: int = 1, sleep=None) -> list:
    """``dvc exp show --json`` of the commits the experiments ``names`` were run on (plain ``dvc exp
    show`` lists only those of HEAD, which moves when results are committed during or after a run),
    and of HEAD. With ``tries`` above 1 a failing ``dvc exp show`` is asked again POLL_SECONDS later
    (it fails now and then while a queue worker sets up or clears its temporary copy)."""
    revs = _baselines(runner, names) if names else []
    command = ["dvc", "exp", "show", "--json", *(arg for rev in revs for arg in ("--rev", rev))]
    for attempt in range(1, tries + 1):
        result = runner(command, capture_output=True, text=True)
        if result.returncode == 0 or attempt == tries:
            break
        (sleep or time.sleep)(POLL_SECONDS)
    _check(result, "dvc exp show")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise AgdError(f"dvc exp show --json printed something that is not JSON ({err})") from None


def _baselines(runner, names: list[str]) -> list[str]:
    """The commits (from ``dvc exp list --all-commits``) that hold an experiment of one of ``names``,
    then HEAD."""
    result = _check(runner(["dvc", "exp", "list", "--all-commits"], capture_output=True, text=True),
                    "dvc exp list")
    found, baseline = [], None
    for line in (result.stdout or "").splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            baseline = line.strip()[:-1]
        elif baseline and any(line.strip().endswith(f"[{name}]") for name in names) and baseline not in found:
            found.append(baseline)
    return [*found, "HEAD"]


def _check(result, what: str):
    if result.returncode != 0:
        raise AgdError(f"{what} failed (exit {result.returncode}): {(result.stderr or '').strip()[-2000:]}")
    return result


def _experiment_rows(shown) -> dict[str, dict]:
    """{experiment name: its "data" (params, metrics)} for every finished named experiment in
    ``dvc exp show --json``. A run that is queued, running or failed, or was killed (DVC keeps listing
    a killed temporary run as "running", beside a later finished run of the same name, and cannot
    remove it), carries an ``executor`` that is not in the state "success", and is skipped."""
    found = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            executor = node.get("executor")
            if executor and not (isinstance(executor, dict) and executor.get("state") == "success"):
                return  # queued, running, failed or killed (a queue's finished run keeps its executor)
            name, data = node.get("name"), node.get("data")
            if isinstance(name, str) and isinstance(data, dict) and node.get("rev") != "workspace":
                found.setdefault(name, data)
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(shown)
    return found


def _summary(data: dict, path: str) -> dict | None:
    for shown, entry in (data.get("metrics") or {}).items():
        if Path(shown).as_posix() == path:
            return (entry or {}).get("data")
    return None


def collect(experiment: Experiment, shown) -> list[dict]:
    """One row per variant: its run name, label and summary metrics. Refuses a missing run."""
    rows_by_name = _experiment_rows(shown)
    rows = []
    for variant in experiment.variants:
        name = experiment.run_name(variant)
        data = rows_by_name.get(name)
        summary = _summary(data, variant.summary) if data else None
        if not summary:
            raise AgdError(f"no finished DVC experiment {name!r} with {variant.summary}; run "
                           f"`python -m stages.experiments run {experiment.name}` first")
        values = {key: summary.get(key) for key in _keys(experiment)}
        bad = {key: value for key, value in values.items() if isinstance(value, float) and not math.isfinite(value)}
        if bad:  # never into results.csv and the README table
            listed = ", ".join(f"{key} = {value}" for key, value in bad.items())
            raise AgdError(f"DVC experiment {name!r}: {variant.summary} holds {listed}, not a finite number; look "
                           "into that run (`dvc exp show`), fix the cause and run it again")
        rows.append({"variant": variant.name, "label": variant.label, "run": name, **values})
    return rows


def overview(experiment: Experiment, shown) -> list[dict]:
    """One row per variant for ``stages.experiments show``: its label, its run's state (finished,
    queued, running, failed, or not run) and, once finished, the table's cells (empty before)."""
    names = [experiment.run_name(v) for v in experiment.variants]
    finished, states = _experiment_rows(shown), _run_states(shown, names)
    keys = _keys(experiment)
    rows = []
    for variant in experiment.variants:
        name = experiment.run_name(variant)
        summary = _summary(finished[name], variant.summary) if name in finished else None
        state = "finished" if summary else (states.get(name) or {}).get("state") or "not run"
        values = {key: summary.get(key) for key in keys} if summary else None
        cells = [_cell(values, column) if values else "" for column in experiment.columns]
        rows.append({"label": variant.label, "run": name, "state": state, "cells": cells})
    return rows


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
