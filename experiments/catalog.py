"""The experiments themselves: each a question, a few variants of a default pipeline (``-S`` overrides
of its params) and the columns of its table. :mod:`experiments.driver` runs them as DVC experiments,
:mod:`experiments.tables` writes their tables, plots and documentation blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agd_pipeline.errors import ConfigError

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
