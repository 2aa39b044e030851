"""The settings schemas: one typed config per stage, and how a params.yaml section becomes one.

Each field carries its help text (shown by ``--help``) and, where it matters, the allowed values.
Values are checked up front; errors name the key (``generate.guidance_max``) and what is allowed.
The command line over these configs lives in :mod:`agd_pipeline.cli`; torch devices and dtypes in
:mod:`agd_pipeline.devices`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .devices import parse_device, resolve_device
from .errors import ConfigError, StoreError
from .adapter_kinds import ADAPTER_KINDS
from .families import ALL_PLACEMENTS, placement_help
from .store.formats import CODECS, FORMATS, resolve_compressor
from .store.schema import CHUNK_BYTES

DEFAULT_PARAMS = "params.yaml"


@dataclass(frozen=True)
class Range:
    """The values a number option takes (each entry, for a list option): an interval, ends open or
    closed or absent, plus the values in ``also`` (a 0 that means off, say); ``note`` says what the
    ends mean. Declared once on the option (``option(..., bounds=Range(0, 1))``): the stage configs'
    shared check enforces it and ``--help`` shows it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    note: str = ""

    def __contains__(self, value) -> bool:
        if value in self.also:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = map(_number_text, (self.low, self.high))
        if self.low == 0 and self.low_open and self.high is None:
            text = "positive"
        elif self.high is None:
            text = f"{'>' if self.low_open else '>='} {low}"
        elif self.low is None:
            text = f"{'<' if self.high_open else '<='} {high}"
        else:
            text = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return " or ".join([*map(_number_text, self.also), text])

    def problem(self) -> str:
        """What an out-of-range value is told."""
        shown = str(self).rpartition(" or ")
        interval = shown[2]
        said = f"be {interval}" if interval == "positive" or interval[0] in "<>" else f"lie in {interval}"
        also = f"be {shown[0]} or " if shown[0] else ""
        return f"must {also}{said}" + (f" ({self.note})" if self.note else "")


def _number_text(value) -> str:
    return str(value) if value is None or isinstance(value, int) else f"{value:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)


def option(default: Any, help: str, choices: tuple | None = None, repeat: bool = False,
           bounds: Range | None = None) -> Any:
    """A config field with the help text and allowed values that --help and validation use.
    ``repeat``: a list option given once per entry on the command line (``--validation-prompt A
    --validation-prompt B``), for entries that may hold spaces and commas. ``bounds``: the range a
    number (or each number of a list) must lie in."""
    meta = {"help": help, "choices": choices, "repeat": repeat, "bounds": bounds}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class StageConfig:
    section: ClassVar[str] = ""
    # the file that marks this stage's own output folder; out_dir must not hold another stage's
    own_marker: ClassVar[str] = ""
    # the family guard (agd_pipeline.settings): the fields naming what the stage reads (field -> kind
    # of input: base, store or adapters) and the kind of input its out_dir writes
    inputs: ClassVar[dict[str, str]] = {}
    writes: ClassVar[str] = ""

    @classmethod
    def family_written(cls, values: dict) -> str | None:
        """The family of what out_dir will hold, where the section's own values tell it (a recipe that
        builds a base); None where it is the family of the stage's inputs."""
        return None

    def check(self) -> None:
        """Checks every stage shares (finite floats, seeds, devices, output folders); each stage's
        own check() calls this first, then its own. Raise ConfigError naming the key."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if hint is float and not math.isfinite(value):
                self.fail(f.name, "must be a finite number")
            if typing.get_origin(hint) is list and typing.get_args(hint) == (float,) and \
                    not all(math.isfinite(v) for v in value):
                self.fail(f.name, "values must be finite numbers")
            bounds = f.metadata.get("bounds")
            if bounds is not None:
                if isinstance(value, list) and not all(v in bounds for v in value):
                    self.fail(f.name, "each value " + bounds.problem())
                elif not isinstance(value, list) and value not in bounds:
                    self.fail(f.name, bounds.problem())
        if getattr(self, "device", "auto") not in ("auto", "cpu"):
            parse_device(self.device, self.key("device"))
        if hasattr(self, "out_dir"):
            self.check_folder("out_dir", output=True)

    def check_machine(self) -> None:
        """What only this machine can answer: is the device there? Stages call it before they load
        anything; check() leaves it out so that a params file for a GPU machine validates anywhere."""
        if getattr(self, "device", "auto") not in ("auto", "cpu"):
            resolve_device(self.device, self.key("device"))

    def check_folder(self, name: str, output: bool = False) -> None:
        """A folder option must be set; an output folder must not be (or lie below) an existing file."""
        value = getattr(self, name)
        if not value.strip():
            self.fail(name, "must name a folder")
        if output:
            path = Path(value)
            for folder in (path, *path.parents):
                if folder.exists() or folder.is_symlink():
                    if not folder.is_dir():
                        self.fail(name, f"{str(folder)!r} exists and is not a folder")
                    break
            for marker, kind in OUTPUT_MARKERS.items():
                if marker != self.own_marker and (path / marker).is_file():
                    self.fail(name, f"holds {kind} ({marker}); writing {self.section} outputs into it would mix "
                              "the two: choose another folder")

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                self.fail(name, "must be positive")

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def fail(self, name: str, message: str) -> None:
        raise ConfigError(f"{self.key(name)}: {message} (got {getattr(self, name)!r})")

    def check_guidance_interval(self) -> None:
        try:
            check_interval(self.guidance_interval, self.key("guidance_interval"))
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OUTPUT_MARKERS = {"model_index.json": "a base model", "manifest.json": "a trajectory store",
                  "adapter_config.json": "adapters", "metrics.json": "evaluation results"}
MAX_TRAJECTORIES_PER_CONDITION = 1_000_000
# train.lr_schedule: the diffusers.optimization schedules that end where a run ends (with a warm-up)
LR_SCHEDULES = ("cosine", "linear", "constant")
# train.report_to: accelerate's trackers (each needs its own package installed)
TRACKERS = ("none", "dvclive", "tensorboard", "wandb")
MAX_GUIDANCE = 50.0  # far beyond any useful guidance scale (paper: 6 for DiT, 12 for SD)
MAX_VALIDATION_ROWS = 16  # train.validation_prompt / validation_w: a grid people can still read
MAX_SEED = 2**32 - 1  # scikit-learn's random_state limit; numpy rejects negative seeds
SEEDS = Range(0, MAX_SEED)
PER_CONDITION = Range(1, MAX_TRAJECTORIES_PER_CONDITION, note="the paper records 1 to 4")
# a guidance scale: 1 is no guidance; above MAX_GUIDANCE is far beyond any useful one
GUIDANCE_SCALES = Range(0, MAX_GUIDANCE, note="1: no guidance; 50 is far beyond any useful scale, the paper "
                        "uses up to 6 for DiT and 12 for SD")
# a share of trajectories keeps the pipeline's default negative prompt, so that sampling without one
# stays distilled too
DEFAULT_EMPTY_NEGATIVE_PROBABILITY = 0.25


def check_interval(value, key: str) -> tuple[float, float] | None:
    """``value`` as (lo, hi), or None for "every step" (empty); ValueError naming ``key`` otherwise."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{key}: give two numbers [lo, hi] (fractions of the noise schedule, 0 = clean, "
                         f"1 = pure noise), or [] for guidance at every step (got {value!r})")
    lo, hi = float(value[0]), float(value[1])
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{key}: [{lo:g}, {hi:g}] must satisfy 0 <= lo < hi <= 1 (fractions of the noise "
                         "schedule; [0, 1] guides every step)")
    return lo, hi

# --------------------------------------------------------------------------------------- stages


@dataclass
class GenerateConfig(StageConfig):
    """Stage `generate` (stage one): sample the base with CFG and record every step into shards."""

    section: ClassVar[str] = "generate"
    own_marker: ClassVar[str] = "manifest.json"
    inputs: ClassVar[dict[str, str]] = {"base_model": "base"}
    writes: ClassVar[str] = "store"
    base_model: str = option("pretrained/toy-dit", "base model: a local diffusers folder or a hub id")
    out_dir: str = option("data/trajectories", "trajectory store to write (resumed if present)")
    classes: list[int] = option([], "class-conditional models: class ids to sample; empty means every "
                                "class of the model (or those in classes_file)", bounds=Range(0, note="class ids"))
    classes_file: str = option("", "class-conditional models: a text file of class ids (whitespace- or "
                               "comma-separated), instead of classes")
    trajectories_per_class: int = option(200, "class-conditional models: trajectories recorded per class",
                                         bounds=PER_CONDITION)
    prompts_file: str = option("", "text models (SD, SDXL, SD3): a text file with one prompt per line")
    negative_prompt: str = option("", "text models: negative prompt of the unconditional branch; empty "
                                  "uses the pipeline's default (empty text, or zeros for SDXL)")
    negative_prompts_file: str = option(
        "", "text models: a text file with one negative prompt per line, instead of negative_prompt. Each "
        "trajectory's unconditional branch uses one of them (or the pipeline's default, see "
        "empty_negative_probability), drawn from (seed, i); the store keeps each trajectory's negative "
        "embeddings, so adapters can follow negative prompts (train.condition_on negative_text)")
    empty_negative_probability: float = option(
        DEFAULT_EMPTY_NEGATIVE_PROBABILITY, "text models, with negative_prompts_file: the chance that a "
        "trajectory uses the empty negative prompt, i.e. the pipeline's default unconditional branch (the "
        "empty prompt for SD and SD3, zeros for SDXL) instead of a line of the file", bounds=Range(0, 1))
    trajectories_per_prompt: int = option(1, "text models: trajectories recorded per prompt",
                                          bounds=PER_CONDITION)
    source: str = option("trajectories", "what stage one records: trajectories (the teacher's own CFG sampling "
                         "trajectories, AGD's data) or forward_noised (real latents noised by the forward process "
                         "at the sampler's timesteps, labelled with CFG's output there: standard guidance "
                         "distillation's data, for the ablation; needs real_data)",
                         ("trajectories", "forward_noised"))
    real_data: str = option("", "source forward_noised: an .npz of real latents [N, C, H, W] with integer labels "
                            "[N] (class models) or captions [N] (text models: each prompt noises latents captioned "
                            "with it); the embedded defaults' base stages write train.npz")
    guidance_min: float = option(1.0, "lower end of the guidance scale w ~ U[min, max] (1 = no guidance)",
                                 bounds=GUIDANCE_SCALES)
    guidance_max: float = option(6.0, "upper end of the guidance scale range", bounds=GUIDANCE_SCALES)
    guidance_interval: list[float] = option([], "guide only the steps whose timestep t / num_train_timesteps lies "
                                            "in [lo, hi] (the guidance interval; 0 = clean, 1 = pure noise), "
                                            "w = 1 at the others; empty: every step")
    num_steps: int = option(32, "sampling steps per trajectory", bounds=POSITIVE)
    scheduler: str = option("", "diffusers scheduler class to sample with; empty keeps the model's")
    seed: int = option(0, "run seed: trajectory i's seed, class and w depend only on (seed, i)", bounds=SEEDS)
    batch_size: int = option(200, "trajectories sampled together (one batched CFG call per step)", bounds=POSITIVE)
    shard_size: int = option(200, "trajectories per shard (each shard is written by one process)", bounds=POSITIVE)
    chunk_bytes: int = option(CHUNK_BYTES, "target bytes of one chunk of the latent arrays, the unit stage "
                              "two reads (as many whole trajectories as fit, split along steps where one "
                              "does not); small arrays are one chunk per shard. The layout follows from the "
                              "data: the default suits every model size",
                              bounds=Range(1024, 1 << 30, note="bytes; default 4194304, 4 MiB"))
    compressor: str = option("auto", "on-disk codec; auto: blosc-zstd for zarr, none for webdataset (whose tar "
                             "members are standard .npz files: deflate or none only)", ("auto", *CODECS))
    format: str = option("zarr", "store format: zarr (one Zarr group per shard, read by chunk rows) or "
                         "webdataset (one tar per shard, a sample per trajectory, for streaming)", tuple(FORMATS))
    bitround_keepbits: int = option(0, "lossy: keep this many of float16's 10 mantissa bits of the latents "
                                    "and outputs (numcodecs BitRound; 0 = lossless)",
                                    bounds=Range(0, 10, note="float16 has 10 mantissa bits; 0 = lossless"))
    record_branches: bool = option(False, "also store the conditional and unconditional outputs")
    verify: str = option("cheap", "check of the shards already complete before resuming: cheap (presence "
                         "and shapes) or full (re-read every array against its checksum); damaged ones "
                         "are written again", ("cheap", "full"))
    restart_on_mismatch: bool = option(False, "when out_dir holds a store written with other settings, delete "
                                       "it and start over (under DVC the old store stays in DVC's cache); "
                                       "otherwise refuse")
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", "dtype the base model runs in (float16/bfloat16 halve GPU memory and time; "
                        "the store is fp16 either way)", ("float32", "float16", "bfloat16"))
    revision: str = option("", "hub base models: the branch, tag or commit to load (recorded in the store, so "
                           "training and sampling load the same weights); empty: the default branch")
    variant: str = option("", "base weights variant to load, e.g. fp16 (files named *.fp16.safetensors); "
                          "empty: the plain weights")

    def check(self) -> None:
        super().check()
        if self.guidance_min > self.guidance_max:
            raise ConfigError(
                f"{self.key('guidance_min')} ({self.guidance_min}) is above "
                f"{self.key('guidance_max')} ({self.guidance_max}): the range must be [min, max]"
            )
        try:  # the store's one codec table says which codec each format takes
            resolve_compressor(self.compressor, self.format)
        except StoreError as err:
            self.fail("compressor", str(err))
        self.check_guidance_interval()
        if self.guidance_interval and self.source == "forward_noised":
            self.fail("guidance_interval", "applies to trajectories only (forward-noised data is labelled with CFG "
                      "at every step); leave it empty")
        if self.real_data and self.source != "forward_noised":
            self.fail("real_data", f"applies only with {self.key('source')} forward_noised (it is {self.source!r}); "
                      "leave it empty")
        if self.classes and self.classes_file:
            raise ConfigError(f"{self.key('classes')} and {self.key('classes_file')} are both set: give one")
        if self.negative_prompts_file and self.negative_prompt:
            raise ConfigError(f"{self.key('negative_prompt')} and {self.key('negative_prompts_file')} are both set: "
                              "give one (the file's trajectories use the pipeline's default negative prompt with "
                              "empty_negative_probability)")
        if not self.negative_prompts_file and self.empty_negative_probability != DEFAULT_EMPTY_NEGATIVE_PROBABILITY:
            self.fail("empty_negative_probability", f"applies only with {self.key('negative_prompts_file')}, "
                      f"which is empty (leave it at {DEFAULT_EMPTY_NEGATIVE_PROBABILITY})")


@dataclass
class TrainConfig(StageConfig):
    """Stage `train` (stage two): train guidance adapters from the trajectory store alone."""

    section: ClassVar[str] = "train"
    own_marker: ClassVar[str] = "adapter_config.json"
    inputs: ClassVar[dict[str, str]] = {"store": "store", "base_model": "base"}
    writes: ClassVar[str] = "adapters"
    store: str = option("data/trajectories", "trajectory store written by stage one")
    out_dir: str = option("data/adapters", "folder for adapters.safetensors, adapter_config.json, loss.csv")
    base_model: str = option("", "base model; empty takes the one named in the store's manifest (its "
                             "weights must match the manifest's fingerprint)")
    adapter: str = option("bottleneck", "adapter kind (agd_pipeline/adapter_kinds/: bottleneck, the default; offset, "
                          "the paper's; cross_attention)", tuple(ADAPTER_KINDS))
    placement: str = option("auto", "where adapters attach. auto: the family's default, the first of its own ("
                            + placement_help() + "). attention: the attention layers (on UNets cross_attention: "
                            "the text cross-attention of every transformer block; +resnet also every ResNet "
                            "block); block: whole transformer blocks; +output also wraps the final token "
                            "projection (on a UNet its conv_out)", ALL_PLACEMENTS)
    width: int = option(32, "adapter hidden width (bottleneck rank, offset MLP width, attention width)",
                        bounds=Range(1, 8192, note="adapters are meant to be small: about 1-5 % of the base"))
    embed_dim: int = option(64, "width of the condition embedding",
                            bounds=Range(1, 8192, note="adapters are meant to be small: about 1-5 % of the base"))
    fourier_frequencies: int = option(3, "Fourier frequencies of the guidance-scale embedding", bounds=Range(0, 32))
    condition_on: list[str] = option(
        [], "what the adapter sees besides the tokens: guidance (required), timestep, class (class "
        "models), text (pooled prompt embedding, or the mean of the prompt tokens), text_tokens (every "
        "prompt token, for the cross_attention adapter), negative_text (the negative prompt's pooled "
        "embedding, or the mean of its tokens; needs a store written with generate.negative_prompts_file), "
        "text_mean and negative_text_mean (the mean of the tokens beside the pooled embedding; SDXL, SD3). "
        "Empty: guidance, timestep and class or text (+ text_mean on pooled models), plus the negative "
        "prompt's on a store with negative prompts"
    )
    guidance_gate: bool = option(True, "scale each adapter's residual by (w - 1): exactly off at w = 1")
    loss_weighting: str = option(
        "guidance", "per-sample weight of the MSE: uniform, 'guidance' = 1 / max(w - 1, 0.5) so "
        "small scales, whose targets differ little from the conditional output, count as much, or "
        "'guidance_squared' = 1 / max(w - 1, 0.5)^2, the error relative to the guidance term (w - 1)(c - u): "
        "every w counts alike in what the gated adapter has to learn",
        ("uniform", "guidance", "guidance_squared"))
    steps: int = option(1500, "optimiser steps. A larger count on a finished out_dir continues it from the "
                        "checkpoint it kept, to the adapters of a run of that count, where the schedule's first steps "
                        "do not depend on it (lr_schedule constant, lr_warmup_fraction 0); otherwise refused",
                        bounds=POSITIVE)
    batch_size: int = option(256, "(trajectory, step) samples per optimiser step", bounds=POSITIVE)
    learning_rate: float = option(3e-3, "peak AdamW learning rate (reached after the warm-up)", bounds=POSITIVE)
    lr_schedule: str = option("cosine", "learning-rate schedule after a linear warm-up (diffusers.optimization): "
                              "cosine decays to 0 at the last step, linear likewise, constant stays at the peak",
                              LR_SCHEDULES)
    lr_warmup_fraction: float = option(0.05, "share of the steps spent warming the learning rate up from 0",
                                       bounds=Range(0, 1, high_open=True, note="a share of train.steps; 0.05 typical"))
    weight_decay: float = option(0.0, "AdamW weight decay",
                                 bounds=Range(0, 1, note="AdamW's decoupled decay; typical values 0 to 0.1"))
    fused_optimizer: bool = option(False, "torch's fused AdamW kernel (one kernel for all adapters: faster on a GPU; "
                                   "results differ from the default only by rounding)")
    gradient_accumulation_steps: int = option(1, "micro-batches of batch_size whose gradients are averaged before "
                                              "each optimiser step: the effective batch is batch_size x this x "
                                              "processes, at one micro-batch's memory",
                                              bounds=Range(1, 4096, note="1: a step per batch"))
    gradient_checkpointing: bool = option(False, "recompute the frozen base's activations in the backward pass "
                                          "instead of keeping them: less memory (a full-size base fits a smaller "
                                          "GPU, or a larger batch), about a third more time, the same result")
    ema_decay: float = option(0.0, "keep an exponential moving average of the adapter weights (diffusers' "
                              "EMAModel, this decay, with its warm-up) and save it as the adapters; 0: off",
                              bounds=Range(0.5, 1, high_open=True, also=(0,), note="0: off; typical: 0.99 to 0.9999"))
    seed: int = option(0, "seed for initialisation and shuffling", bounds=SEEDS)
    loader_workers: int = option(0, "DataLoader worker processes that read and decode the store (started once "
                                 "per run, forked on Linux); 0 reads in threads of the training process. "
                                 "Either way reading runs one buffer ahead, and the batches are the same",
                                 bounds=Range(0, 128, note="0 reads in the training process"))
    checkpoint_every: int = option(500, "steps between resumable checkpoints (0: only at the end)",
                                   bounds=Range(0, note="0: only at the end"))
    dtype: str = option("", "dtype the frozen base runs in; empty takes the one stage one used (the "
                        "adapters themselves train in float32). accelerate's mixed precision "
                        "(ACCELERATE_MIXED_PRECISION) must agree: bf16 only with bfloat16, fp16 only with float16",
                        ("", "float32", "float16", "bfloat16"))
    restart_on_mismatch: bool = option(False, "when out_dir holds a checkpoint or finished adapters of other "
                                       "settings or another store, delete them and start over; otherwise "
                                       "refuse (the same settings on the same store: nothing to do; a larger "
                                       "steps: continue, see steps)")
    verify: str = option("changed", "store check before training (never train on corrupted data): changed "
                         "re-reads every shard against its checksums except those that passed such a re-read "
                         "before and whose files are unchanged since (same names, sizes and modification "
                         "times; the record is kept outside the store, in $AGD_CACHE_DIR, else "
                         "$XDG_CACHE_HOME/agd-pipeline, else ~/.cache/agd-pipeline); full re-reads every shard "
                         "(and renews the records); cheap checks presence, shapes, chunk files, sizes and a "
                         "tar's members only. Whatever the mode, the loader checks every unit it reads against "
                         "the digest recorded when it was written, so bytes changed in place (modification "
                         "time kept, or a failing disk) stop training at the damaged unit; full finds them "
                         "before training starts", ("changed", "full", "cheap"))
    device: str = option("auto", "torch device: auto, cpu, cuda, ...")
    report_to: str = option("none", "experiment tracker for the loss and learning rate, through accelerate "
                            "(loss.csv is always written and is what `dvc plots show` draws)", TRACKERS)
    validate_every: int = option(0, "steps between validation grids (CFG | AGD at each validation_w from fixed "
                                 "seeds, in out_dir/validation/ and, with report_to, the tracker); 0: one grid, after "
                                 "the last step; -1: none",
                                 bounds=Range(-1, note="-1: no grids; 0: one after the last step; else steps"))
    validation_prompt: list[str] = option(
        [], "text models: the prompts of the validation grids, one row each (repeat --validation-prompt per "
        "prompt). Empty: the store's first 4 prompts; class models show their first 4 classes and take none",
        repeat=True)
    validation_w: list[float] = option(
        [], "guidance scales of the validation grids, a CFG and an AGD column each (repeatable). Empty: the "
        "middle and the top of the store's guidance range", repeat=True, bounds=GUIDANCE_SCALES)

    def check(self) -> None:
        super().check()
        self.check_folder("store")
        if len(self.validation_prompt) > MAX_VALIDATION_ROWS or not all(p.strip() for p in self.validation_prompt):
            self.fail("validation_prompt", f"must be at most {MAX_VALIDATION_ROWS} prompts, none empty")
        if len(self.validation_w) > MAX_VALIDATION_ROWS:
            self.fail("validation_w", f"must be at most {MAX_VALIDATION_ROWS} guidance scales")
        allowed = {"guidance", "timestep", "class", "text", "text_tokens", "negative_text", "text_mean",
                   "negative_text_mean"}
        unknown = set(self.condition_on) - allowed
        if unknown:
            self.fail("condition_on", f"unknown entries {sorted(unknown)}; allowed: {sorted(allowed)}")
        if self.condition_on and "guidance" not in self.condition_on:
            self.fail("condition_on", "must include 'guidance': the adapter has to know w")


@dataclass
class EvaluateConfig(StageConfig):
    """Stage `evaluate`: CFG (2 evaluations per step) against AGD (1 per step) on the same seeds."""

    section: ClassVar[str] = "evaluate"
    own_marker: ClassVar[str] = "metrics.json"
    inputs: ClassVar[dict[str, str]] = {"adapters": "adapters", "base_model": "base"}
    adapters: str = option("data/adapters", "adapter folder written by stage two")
    base_model: str = option("", "base model; empty takes the one named in the adapter config")
    out_dir: str = option("data/eval", "folder for metrics.json, plots CSVs and sample grids")
    guidance_scales: list[float] = option(
        [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0], "guidance scales to evaluate (may exceed the training range)",
        bounds=GUIDANCE_SCALES)
    samples_per_class: int = option(50, "samples per class and guidance scale (class models; at least 2 for FID "
                                    "statistics), or per evaluation prompt (text models)", bounds=POSITIVE)
    guidance_interval: list[float] = option([], "guide CFG and AGD alike only where t / num_train_timesteps lies in "
                                            "[lo, hi] (0 = clean, 1 = pure noise); empty: the interval the "
                                            "adapters' trajectories were recorded with (none: every step); "
                                            "[0, 1]: every step")
    num_steps: int = option(0, "sampling steps; 0 takes the steps the trajectories were recorded with",
                            bounds=Range(0, note="0: the steps the trajectories were recorded with"))
    scheduler: str = option("", "diffusers scheduler class to sample with; empty: the one the adapters' "
                            "trajectories were recorded with (another one warns)")
    seed: int = option(1234, "seed of the evaluation noise (the same for every method)", bounds=SEEDS)
    split: str = option("validation", "validation: the seeds (and, for the embedded text defaults, prompts) every "
                        "tuning decision is made on; test: fresh seeds and held-out prompts, for reporting only",
                        choices=("validation", "test"))
    batch_size: int = option(500, "images sampled together; the speed ratio is measured at this size", bounds=POSITIVE)
    grid_columns: int = option(6, "samples per class shown in the PNG grids", bounds=POSITIVE)
    prompts_file: str = option("", "text models: evaluation prompts, one per line, or 'digit<TAB>prompt' lines "
                               "(then prompt accuracy is measured); empty: the base folder's prompts/eval.tsv")
    negative_check_scale: float = option(0.0, "text defaults: w of the negative-prompt check (a digit-agnostic "
                                         "prompt, a negative prompt naming a digit); 0 skips it",
                                         bounds=Range(0, MAX_GUIDANCE, note="0 skips the check"))
    negative_check_samples: int = option(30, "negative-prompt check: samples per negative digit", bounds=POSITIVE)
    judge: str = option("", "a judge factory, 'module:function' (agd_pipeline.judges): called with the base folder, "
                        "it returns the classifier that measures class or prompt accuracy and the FIDs in its "
                        "feature space, with held-out real images; empty: no classifier judge. The embedded "
                        "defaults': defaults.judges:embedded_judges")
    fid_reference: str = option("", "real models: a folder of reference images, or an .npz of clean-fid statistics "
                                "(mu, sigma; see agd_pipeline.real_metrics.reference_statistics): Inception FID of "
                                "every sample set against it")
    clip_model: str = option("", "real text models: a CLIP model (folder or hub id, transformers' CLIPModel): the "
                             "CLIP score of every sample set against its prompts")
    device: str = option("auto", "torch device: auto, cpu, cuda, ...")

    def check(self) -> None:
        super().check()
        self.check_folder("adapters")
        if self.judge and (":" not in self.judge or not all(part.strip() for part in self.judge.split(":", 1))):
            self.fail("judge", "give a judge factory as 'module:function' (e.g. defaults.judges:embedded_judges), "
                      "or leave it empty for no classifier judge")
        self.check_guidance_interval()
        if not self.guidance_scales:
            self.fail("guidance_scales", "needs at least one value")


# Every stage's config by its params.yaml section: the library's, and those registered by a project
# that adds stages of its own (the repository's embedded defaults: defaults/config.py).
CONFIG_CLASSES: dict[str, type[StageConfig]] = {
    cls.section: cls for cls in (GenerateConfig, TrainConfig, EvaluateConfig)}


def register_config(cls: type[StageConfig], output_kind: str = "") -> type[StageConfig]:
    """Make a stage config of a project's own known to the settings (its params.yaml section, the
    family guard) and, with ``output_kind``, its ``own_marker`` to the output-folder check (what a
    folder holding it is called in messages). Returns ``cls`` (usable as a decorator)."""
    CONFIG_CLASSES[cls.section] = cls
    if output_kind and cls.own_marker:
        OUTPUT_MARKERS.setdefault(cls.own_marker, output_kind)
    return cls


# ------------------------------------------------------------------------------ loading & CLI


def _fields(cls: type[StageConfig]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)]


def coerce_value(cls: type[StageConfig], field: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise naming the key."""
    key = f"{cls.section}.{field.name}"
    hint = typing.get_type_hints(cls)[field.name]
    origin = typing.get_origin(hint)
    try:
        if origin is list:
            (item_type,) = typing.get_args(hint)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = [_scalar(item_type, v) for v in value]
        elif origin in (typing.Union, types.UnionType):
            if value is None or value == "":
                value = None
            else:
                value = _scalar(next(a for a in typing.get_args(hint) if a is not type(None)), value)
        else:
            value = _scalar(hint, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}") from None
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(map(str, choices))}")
    return value


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)
    raise TypeError(kind)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return getattr(hint, "__name__", str(hint))


MAX_PARAMS_BYTES = 16 * 2**20


def read_params(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found (run from the repository root or pass --params)")
    if path.is_dir():
        raise ConfigError(f"params file {path} is a folder; give a YAML file (--params)")
    try:
        with open(path, "rb") as f:  # bounded: /dev/zero or a huge file must not eat the memory
            raw = f.read(MAX_PARAMS_BYTES + 1)
        if len(raw) > MAX_PARAMS_BYTES:
            raise ConfigError(f"params file {path} is larger than {MAX_PARAMS_BYTES // 2**20} MiB; give a YAML "
                              "file (--params)")
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"params file {path} is not a text (UTF-8) file; give a YAML file (--params)") from None
    except RecursionError:
        raise ConfigError(f"params file {path} is nested too deeply to be a params file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]  # one line, not YAML's snippet
        if mark is not None:
            reason += f" (line {mark.line + 1}, column {mark.column + 1})"
        raise ConfigError(f"params file {path} is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path} must map stage names to sections")
    return data


def params_section(cls: type[StageConfig], params: dict) -> dict:
    """The section of ``cls`` in a read params file ({} when absent), checked to be a mapping."""
    section = params.get(cls.section) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{cls.section}: the section must be a mapping of keys to values")
    return section


def load_config(cls: type[StageConfig], params: str | os.PathLike | dict | None = DEFAULT_PARAMS,
                overrides: dict | None = None):
    """Build a stage config from its params.yaml section (or that section as a dict) plus
    overrides, fully validated."""
    if params is None:
        section = {}
    elif isinstance(params, dict):  # the section itself, as tests and library callers pass it
        section = params
    else:
        section = params_section(cls, read_params(params))
    known = {f.name: f for f in _fields(cls)}
    merged = dict(section)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(map(str, set(merged) - set(known)))  # YAML keys need not be strings
    if unknown:
        raise ConfigError(
            f"{cls.section}.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(known))}"
        )
    values = {name: coerce_value(cls, known[name], value) for name, value in merged.items()}
    config = cls(**values)
    config.check()
    return config
