"""Guidance adapters: small w-conditioned residual modules hooked onto a frozen base.

``AdaptedModel(base, config)(x_t, t, cond, w)`` embeds the condition once, makes it visible
to the forward hooks for that one call only, and clears it afterwards; nothing is set on the base's
modules between calls. Every adapter's output layer starts at zero, so a fresh AdaptedModel is
exactly the base model, and the base's own call (no condition active) is never altered.

Kinds (all add a residual to the output of the wrapped layer, computed from its input tokens):
  * ``offset``: an MLP of the condition embedding; one vector added to every token (the paper's).
  * ``cross_attention``: the wrapped layer's input tokens attend to condition tokens (w, t, class or
    prompt; with ``text_tokens`` every prompt token is one more condition token).
  * ``bottleneck``: a token-wise low-rank MLP whose hidden units are scaled and shifted by the
    condition embedding (FiLM), so the residual depends on the content and on w.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from . import adapter_kinds, families, guidance
from .config import check_interval
from .errors import ModelError, WriteError, command_line, write_errors, write_reason
from .modelcard import MODEL_CARD, write_model_card  # noqa: F401 - MODEL_CARD re-exported (training imports it here)
from .models import BaseModel, count_parameters, load_base_model, recorded_hub_options

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "agd-adapters"
FORMAT_VERSION = 2  # 2: "integrity" records the sha256 of the weights and of the config itself
READABLE_VERSIONS = (1, FORMAT_VERSION)  # 1 loads with a warning: it carries no digests
INTEGRITY = "integrity"


@dataclass
class AdapterConfig:
    kind: str = "bottleneck"
    placement: str = "attention+output"
    width: int = 32
    embed_dim: int = 64
    fourier_frequencies: int = 3
    condition_on: list[str] = field(default_factory=lambda: ["guidance", "timestep", "class"])
    num_classes: int = 0
    # Text models: width of the prompt token embeddings and of the pooled embedding (0: none).
    text_dim: int = 0
    pooled_dim: int = 0
    # w is centred and scaled before the Fourier features: w_feature = (w - 1) / guidance_scale_unit
    guidance_scale_unit: float = 5.0
    # Multiply every residual by (w - 1) / unit: CFG's change to the output is (w - 1) * (cond - uncond),
    # so the adapters then learn the per-unit direction, and are exactly off at w = 1.
    guidance_gate: bool = True


# ------------------------------------------------------------------------------- embedding


CONDITION_SOURCES = ("guidance", "timestep", "class", "text", "text_tokens", "negative_text", "text_mean",
                     "negative_text_mean")
# The sources that read the prompt (text models only), and the ones that read the negative prompt
# per sample (stores written with generate.negative_prompts_file only).
TEXT_SOURCES = ("text", "text_tokens", "negative_text", "text_mean", "negative_text_mean")
NEGATIVE_SOURCES = ("negative_text", "negative_text_mean")
# Read the mean of the prompt tokens beside the pooled embedding: models with a pooled one only.
MEAN_SOURCES = ("text_mean", "negative_text_mean")


def default_condition_on(conditioning: str, negative_prompts: bool = False, pooled: bool = False) -> list[str]:
    """What adapters see by default: w, t and the class or prompt; plus the negative prompt where
    the training data has one per trajectory (``negative_prompts``, text models). On a model with a
    pooled prompt embedding (``pooled``: SDXL, SD3) also the mean of the prompt's tokens: the pooled
    embedding of a CLIP encoder can carry the prompt's content poorly (see README, SDXL)."""
    if conditioning == "class":
        return ["guidance", "timestep", "class"]
    text = ["text", *(["text_mean"] if pooled else [])]
    negative = ["negative_text", *(["negative_text_mean"] if pooled else [])] if negative_prompts else []
    return ["guidance", "timestep", *text, *negative]


class ConditionEmbedding(nn.Module):
    """Embeds w (Fourier features) and optionally t, the class or the prompt into one vector and a
    few condition tokens. ``text`` is the pooled prompt embedding where the model has one (SDXL,
    SD3), else the mean of the prompt tokens (SD 1.x/2.x); ``text_mean`` adds that mean beside the
    pooled embedding (models with one only); ``text_tokens`` adds every prompt token as a condition
    token (for the cross-attention adapter); ``negative_text`` (``negative_text_mean``) is the
    negative prompt's embedding, pooled or averaged like ``text`` (``text_mean``), read from the
    condition's ``negative_prompt_embeds`` (and ``negative_pooled_prompt_embeds``): the
    unconditional branch that CFG would have used."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.register_buffer(
            "frequencies", math.pi * 2.0 ** torch.arange(config.fourier_frequencies, dtype=torch.float32),
            persistent=False,
        )
        fourier_dim = 1 + 2 * config.fourier_frequencies
        self.guidance = nn.Sequential(nn.Linear(fourier_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        used = set(config.condition_on)
        self.use_timestep = "timestep" in used
        self.use_class = "class" in used
        self.use_text = "text" in used
        self.use_text_tokens = "text_tokens" in used
        self.use_negative_text = "negative_text" in used
        self.use_text_mean = "text_mean" in used
        self.use_negative_text_mean = "negative_text_mean" in used
        if used & set(TEXT_SOURCES) and not config.text_dim:
            raise ModelError("adapters conditioned on the prompt need a text model (text_dim is 0)")
        if used & set(MEAN_SOURCES) and not config.pooled_dim:
            raise ModelError(f"{sorted(used & set(MEAN_SOURCES))} read the prompt tokens' mean beside a pooled "
                             "embedding; this model has none (text already reads that mean)")
        if self.use_class and not config.num_classes:
            raise ModelError("adapters conditioned on the class need a class-conditional model (num_classes is 0)")
        if self.use_timestep:
            self.timestep = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        if self.use_class:
            self.label = nn.Embedding(config.num_classes + 1, dim)  # + the null class
        pooled_or_mean = config.pooled_dim or config.text_dim
        # one normalised projection per prompt source, created in this order (the order fixes the
        # random initialisation); the negative prompt gets its own: it acts against the prompt
        for name, used_here, width in (("text", self.use_text, pooled_or_mean),
                                       ("text_tokens", self.use_text_tokens, config.text_dim),
                                       ("negative_text", self.use_negative_text, pooled_or_mean),
                                       ("text_mean", self.use_text_mean, config.text_dim),
                                       ("negative_text_mean", self.use_negative_text_mean, config.text_dim)):
            if used_here:
                setattr(self, name, nn.Sequential(nn.LayerNorm(width, elementwise_affine=False),
                                                  nn.Linear(width, dim)))

    def fourier(self, w: torch.Tensor) -> torch.Tensor:
        u = ((w.float() - 1.0) / self.config.guidance_scale_unit)[:, None]
        angles = u * self.frequencies
        return torch.cat([u, angles.sin(), angles.cos()], dim=-1)

    def forward(self, w, t, cond: dict):
        tokens = [self.guidance(self.fourier(w))]
        if self.use_timestep:
            tokens.append(self.timestep(timestep_features(t, w.shape[0], 32).to(w.device)))
        if self.use_class:
            tokens.append(self.label(cond["class_label"].clamp(0, self.config.num_classes)))
        if self.use_text:
            if self.config.pooled_dim:
                source = cond["pooled_prompt_embeds"]
            else:
                source = cond["prompt_embeds"].float().mean(dim=1)
            tokens.append(self.text(source.float()))
        if self.use_negative_text:
            key = "negative_pooled_prompt_embeds" if self.config.pooled_dim else "negative_prompt_embeds"
            if key not in cond:
                raise ModelError(f"these adapters condition on the negative prompt (negative_text): the condition "
                                 f"needs {key}, one row per sample (the negative prompt's embeddings)")
            source = cond[key] if self.config.pooled_dim else cond[key].float().mean(dim=1)
            tokens.append(self.negative_text(source.float()))
        if self.use_text_mean:
            tokens.append(self.text_mean(cond["prompt_embeds"].float().mean(dim=1)))
        if self.use_negative_text_mean:
            if "negative_prompt_embeds" not in cond:
                raise ModelError("these adapters condition on the negative prompt (negative_text_mean): the "
                                 "condition needs negative_prompt_embeds, one row per sample")
            tokens.append(self.negative_text_mean(cond["negative_prompt_embeds"].float().mean(dim=1)))
        tokens = torch.stack(tokens, dim=1)  # [B, K, dim]
        vector = F.silu(tokens.sum(dim=1))
        if self.use_text_tokens:
            tokens = torch.cat([tokens, self.text_tokens(cond["prompt_embeds"].float())], dim=1)
        gate = None
        if self.config.guidance_gate:
            gate = ((w.float() - 1.0) / self.config.guidance_scale_unit)[:, None, None]
        return Condition(vector=vector, tokens=tokens, gate=gate)


@dataclass
class Condition:
    vector: torch.Tensor  # [B, dim]
    tokens: torch.Tensor  # [B, K, dim]
    gate: torch.Tensor | None = None  # [B, 1, 1] residual scale, or None


def timestep_features(t, batch: int, dim: int) -> torch.Tensor:
    """Sinusoidal features of the diffusion timestep (0..1000 scale)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    t = t.expand(batch) if t.numel() == 1 else t
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# -------------------------------------------------------------------------------- adapters


# The kinds live in agd_pipeline/adapter_kinds/, one module each, behind its registry; the names
# re-exported here are the ones this module has always offered.
ADAPTER_KINDS = adapter_kinds.ADAPTER_KINDS


# ------------------------------------------------------------------------------- placement


# Where adapters may attach, per family (its module in agd_pipeline.families); the first is "auto"'s.
PLACEMENTS, ALL_PLACEMENTS = families.PLACEMENTS, families.ALL_PLACEMENTS


def resolve_placement(family: str, placement: str) -> str:
    allowed = PLACEMENTS.get(family, ())
    if placement == "auto" and allowed:
        return allowed[0]
    if placement not in allowed:
        raise ModelError(f"placement {placement!r} is not defined for the {family!r} family "
                         f"(allowed: auto, {', '.join(allowed)})")
    return placement


def adapter_targets(base: BaseModel, placement: str) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, input width, output width) of every layer an adapter wraps.

    Which layers each placement wraps, and why, is the family's (``adapter_targets`` in its module
    of agd_pipeline.families); ``+output`` placements also wrap its final token projection.
    """
    placement = resolve_placement(base.family, placement)
    net = base.net
    targets = base.spec.adapter_targets(net, placement)
    if not targets:
        raise ModelError(f"{base.model_id!r}: placement {placement!r} found no layers to wrap")
    if placement.endswith("+output"):
        output = base.spec.output_layer(net)
        if isinstance(output, nn.Conv2d):  # a UNet's conv_out: the adapter sees each pixel as a token
            widths = output.in_channels, output.out_channels
        else:
            widths = output.in_features, output.out_features
        targets.append((_module_name(net, output), output, *widths))
    return targets


def _module_name(net: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in net.named_modules() if m is module)


def _add_residual(output, residual: torch.Tensor, gate: torch.Tensor | None):
    """The wrapped layer's output plus the residual, times the gate where there is one, in one pass
    (on a small network these elementwise passes are most of what an adapter costs a step)."""
    main = output[0] if isinstance(output, tuple) else output  # SD3's joint attention: (image, text tokens)
    if gate is None:
        main = main + residual
    else:
        main = torch.addcmul(main, residual, gate.to(residual.dtype).view(-1, *[1] * (residual.dim() - 1)))
    return (main, *output[1:]) if isinstance(output, tuple) else main


class AdaptedModel(nn.Module):
    """A frozen base plus guidance adapters; one network evaluation gives the guided output."""

    def __init__(self, base: BaseModel, config: AdapterConfig):
        super().__init__()
        kind = adapter_kinds.adapter_class(config.kind)
        self.config = config
        self.base = base  # a plain attribute: the base's tensors never enter this state dict
        targets = adapter_targets(base, config.placement)
        self.target_names = [name for name, *_ in targets]
        self.embedding = ConditionEmbedding(config)
        self.adapters = nn.ModuleList([kind(dim, out_dim, config)
                                       for _, _, dim, out_dim in targets])
        self.to(base.device)
        # the guidance interval of the trajectories the adapters learned (agd_pipeline.guidance); None:
        # every step guided. Set by training and loading from the store header / adapter config.
        self.guidance_interval: tuple[float, float] | None = None
        self._condition: Condition | None = None
        self._handles = [module.register_forward_hook(self._make_hook(i), with_kwargs=True)
                         for i, (_, module, *_) in enumerate(targets)]

    def _make_hook(self, index: int):
        def hook(module, args, kwargs, output):
            condition = self._condition
            if condition is None:  # the base called on its own: leave it exactly as it is
                return None
            tokens = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))  # ResnetBlock2D's
            spatial = tokens.dim() == 4  # a convolution's [B, C, H, W] input: one token per pixel
            if spatial:  # one copy in token order, which the adapter's norm and matmuls read
                size = tokens.shape[2:]
                tokens = tokens.flatten(2).transpose(1, 2).contiguous()
            residual = self.adapters[index](tokens, condition)
            if spatial:  # a [B, C, H, W] view ([B, C, 1, 1] for a residual shared by every pixel)
                residual = residual.transpose(1, 2).unflatten(2, size if residual.shape[1] > 1 else (1, 1))
            return _add_residual(output, residual, condition.gate)
        return hook

    def embed(self, x, t, cond: dict, guidance_scale) -> tuple[Condition, dict]:
        """The adapters' condition for one call of the base on ``x`` (w shared or one per sample),
        and ``cond`` as a condition dict on x's device."""
        guidance_scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device)
        if guidance_scale.dim() == 0:
            guidance_scale = guidance_scale.expand(x.shape[0])
        guidance_scale = guidance.effective_scale(guidance_scale, t, self.guidance_interval,
                                                  guidance.num_train_timesteps(self.base.scheduler))
        cond = {name: torch.as_tensor(value).to(x.device) for name, value in self.base.as_condition(cond).items()}
        return self.embedding(guidance_scale, t, cond), cond

    @contextlib.contextmanager
    def conditioned(self, condition: Condition):
        """The hooks see ``condition`` inside this block only; afterwards the base is itself again.
        ``forward`` uses it around its one call; so does a pipeline's denoiser call
        (:mod:`agd_pipeline.pipelines`)."""
        self._condition = condition
        try:
            yield
        finally:
            self._condition = None

    def forward(self, x, t, cond: dict, guidance_scale):
        if self._skips(t):
            return self.base.predict(x, t, cond)  # outside the interval: w = 1, the gated adapters add zero
        condition, cond = self.embed(x, t, cond, guidance_scale)
        with self.conditioned(condition):
            return self.base.predict(x, t, cond)

    def _skips(self, t) -> bool:
        """Whether a sampling call at ``t`` lies wholly outside the guidance interval, where gated
        adapters add exactly zero (training runs them anyway, for the same graph every step)."""
        if self.guidance_interval is None or not self.config.guidance_gate or self.training:
            return False
        return not guidance.inside(t, self.guidance_interval, guidance.num_train_timesteps(self.base.scheduler)).any()

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.net.eval()  # DiT drops labels in train mode: the base stays in eval()
        return self

    def remove(self) -> None:
        """Detach the hooks: the base is then exactly as it was loaded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def parameter_report(self) -> dict:
        adapter = count_parameters(self)
        base = count_parameters(self.base.net)
        return {"adapter": adapter, "base": base, "share": adapter / base}


# ----------------------------------------------------------------------------- save & load


def config_digest(config: dict) -> str:
    """sha256 of an adapter config without its own "integrity" section, in a canonical JSON form
    (sorted keys, no spaces), so the digest does not depend on formatting."""
    body = {k: v for k, v in config.items() if k != INTEGRITY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_adapters(model: AdaptedModel, folder: str | Path, extra: dict | None = None) -> Path:
    """Write adapters.safetensors, adapter_config.json (with the sha256 of both, checked on every
    load) and the model card. Both files are written to temporaries first; a failed write (disk
    full, permission) removes them and raises one WriteError, leaving the folder as it was."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": asdict(model.config),
        "placements": model.target_names,
        "base_model": model.base.describe(),
        "parameters": model.parameter_report(),
        **(extra or {}),
    }
    config.pop(INTEGRITY, None)
    weights_tmp, config_tmp = folder / (ADAPTER_WEIGHTS + ".tmp"), folder / (ADAPTER_CONFIG + ".tmp")
    try:
        save_file(tensors, weights_tmp)
        config[INTEGRITY] = {"algorithm": "sha256", "files": {ADAPTER_WEIGHTS: _file_digest(weights_tmp)},
                             "config": config_digest(config)}
        config_tmp.write_text(json.dumps(config, indent=2) + "\n")
        # a kill between the two renames leaves files whose digests disagree: refused on load
        weights_tmp.replace(folder / ADAPTER_WEIGHTS)
        config_tmp.replace(folder / ADAPTER_CONFIG)
    except write_errors() as err:
        for tmp in (weights_tmp, config_tmp):
            tmp.unlink(missing_ok=True)
        reason = write_reason(err)
        raise WriteError(f"{folder}: cannot write the adapters ({reason}); nothing there was replaced. Free "
                         "space or choose another output folder, then run the command again", reason) from None
    write_model_card(folder, config)
    return folder


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def retrain() -> str:
    """What to do about an edited or damaged adapter file, naming the train command as the user runs it."""
    return f"the file was edited or damaged: re-run training (`{command_line('train')}`) to write it again"
MAX_ADAPTER_WIDTH = 65536  # far above anything training writes; guards the allocation on load


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _adapter_section_problem(section) -> str | None:
    """What is wrong with the "adapter" section (the AdapterConfig fields), or None."""
    if not isinstance(section, dict):
        return f'"adapter" must be an object of {AdapterConfig.__name__} fields'
    fields = [f.name for f in dataclasses.fields(AdapterConfig)]
    missing = [name for name in fields if name not in section]
    if missing:
        return f'"adapter" lacks the key {missing[0]!r}'
    unknown = sorted(set(section) - set(fields))
    if unknown:
        return f'"adapter" has the unknown key {unknown[0]!r} (known: {", ".join(fields)})'
    checks = {
        "kind": (lambda v: v in ADAPTER_KINDS, f"one of {', '.join(ADAPTER_KINDS)}"),
        "placement": (lambda v: v in ALL_PLACEMENTS[1:], f"one of {', '.join(ALL_PLACEMENTS[1:])}"),
        "width": (lambda v: _is_int(v) and 0 < v <= MAX_ADAPTER_WIDTH, f"an integer in [1, {MAX_ADAPTER_WIDTH}]"),
        "embed_dim": (lambda v: _is_int(v) and 0 < v <= MAX_ADAPTER_WIDTH,
                      f"an integer in [1, {MAX_ADAPTER_WIDTH}]"),
        "fourier_frequencies": (lambda v: _is_int(v) and 0 <= v <= 32, "an integer in [0, 32]"),
        "condition_on": (lambda v: isinstance(v, list) and "guidance" in v and all(
            isinstance(c, str) and c in CONDITION_SOURCES for c in v),
            f"a list of {', '.join(CONDITION_SOURCES)} that includes guidance"),
        "num_classes": (lambda v: _is_int(v) and 0 <= v <= 10**6, "an integer >= 0"),
        "text_dim": (lambda v: _is_int(v) and 0 <= v <= MAX_ADAPTER_WIDTH, "an integer >= 0"),
        "pooled_dim": (lambda v: _is_int(v) and 0 <= v <= MAX_ADAPTER_WIDTH, "an integer >= 0"),
        "guidance_scale_unit": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "guidance_gate": (lambda v: isinstance(v, bool), "true or false"),
    }
    for name, (valid, allowed) in checks.items():
        if not valid(section[name]):
            return f'"adapter.{name}" is {json.dumps(section[name])}; it must be {allowed}'
    used = set(section["condition_on"])
    if used & set(TEXT_SOURCES) and not section["text_dim"]:
        return '"adapter.condition_on" names the prompt, but "adapter.text_dim" is 0 (not a text model)'
    if used & set(MEAN_SOURCES) and not section["pooled_dim"]:
        return (f'"adapter.condition_on" names {sorted(used & set(MEAN_SOURCES))[0]}, but "adapter.pooled_dim" '
                'is 0 (a model without a pooled prompt embedding: text already reads the mean)')
    if "class" in used and not section["num_classes"]:
        return '"adapter.condition_on" names the class, but "adapter.num_classes" is 0 (not a class model)'
    return None


def _adapter_config_problem(config) -> str | None:
    """What is wrong with a parsed adapter_config.json, or None. Sections that training writes
    but a bare save_adapters leaves out (sampler, guidance) are checked where present."""
    if not isinstance(config, dict):
        return "it must hold a JSON object"
    if config.get("format") != FORMAT:
        return f"not an AGD adapter config (format {json.dumps(config.get('format'))}, expected {FORMAT!r})"
    if config.get("format_version") not in READABLE_VERSIONS:
        return (f"format_version {json.dumps(config.get('format_version'))}; this version reads "
                f"{' and '.join(map(str, READABLE_VERSIONS))}")
    for key in ("adapter", "placements", "base_model"):
        if key not in config:
            return f"the key {key!r} is missing"
    problem = _adapter_section_problem(config["adapter"])
    if problem:
        return problem
    placements = config["placements"]
    if not (isinstance(placements, list) and placements and all(isinstance(p, str) and p for p in placements)):
        return '"placements" must be a non-empty list of layer names'
    recorded = config["base_model"]
    if not isinstance(recorded, dict):
        return '"base_model" must be an object (id, class, fingerprints)'
    for key in ("id", "class", "architecture_fingerprint", "weights_fingerprint"):
        if not (isinstance(recorded.get(key), str) and recorded[key]):
            return f'"base_model.{key}" must be a non-empty string (got {json.dumps(recorded.get(key))})'
    if recorded.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
        return f'"base_model.dtype" is {json.dumps(recorded["dtype"])}; it must be float32, float16 or bfloat16'
    if "training" in config:  # written by stages.train, which always records these
        for key in ("sampler", "guidance"):
            if key not in config:
                return f"the key {key!r} is missing"
    if "sampler" in config:
        sampler = config["sampler"]
        if not (isinstance(sampler, dict) and _is_int(sampler.get("num_steps")) and
                0 < sampler["num_steps"] <= 100_000):
            return '"sampler.num_steps" must be a positive integer (the steps the trajectories were recorded with)'
    if "guidance" in config:
        guidance_section = config["guidance"]
        if not (isinstance(guidance_section, dict) and _is_number(guidance_section.get("min"))
                and _is_number(guidance_section.get("max")) and guidance_section["min"] <= guidance_section["max"]):
            return '"guidance" must hold finite numbers min <= max'
        try:
            check_interval(guidance_section.get("interval"), '"guidance.interval"')
        except ValueError as err:
            return str(err)
    if not isinstance(config.get("negative_prompt", ""), str):
        return '"negative_prompt" must be a string'
    if config["format_version"] >= 2:
        integrity = config.get(INTEGRITY)
        if not (isinstance(integrity, dict) and integrity.get("algorithm") == "sha256"
                and _is_digest(integrity.get("config")) and isinstance(integrity.get("files"), dict)
                and _is_digest(integrity["files"].get(ADAPTER_WEIGHTS))):
            return (f'"{INTEGRITY}" must hold the sha256 of the config and of {ADAPTER_WEIGHTS} '
                    "(training writes it)")
    return None


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_adapter_config(folder: str | Path) -> dict:
    """The parsed, validated adapter_config.json of an adapter folder; ModelError (one line, saying
    what is wrong) for anything training would not have written."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise ModelError(f"{folder}: no {ADAPTER_CONFIG}; is this an adapter folder written by "
                         f"`{command_line('train')}`?")
    if not path.is_file():
        raise ModelError(f"{path}: not a file; {retrain()}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not a text file; {retrain()}") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not valid JSON ({err}); {retrain()}") from None
    except RecursionError:
        raise ModelError(f"{path}: nested too deeply to be an adapter config; {retrain()}") from None
    problem = _adapter_config_problem(config)
    if problem:
        raise ModelError(f"{path}: {problem}; {retrain()}")
    if config["format_version"] < 2:
        warnings.warn(f"{folder}: written by an older version of this tool, without digests, so damage to "
                      "these adapters cannot be detected; re-run training to write them with digests",
                      stacklevel=2)
    elif config_digest(config) != config[INTEGRITY]["config"]:
        raise ModelError(f"{path}: its contents differ from the sha256 recorded when training wrote "
                         f"it; {retrain()}")
    return config


def load_adapted_model(folder: str | Path, base: BaseModel | None = None, device="cpu") -> AdaptedModel:
    """Load adapters onto their base. A different architecture is refused; other weights warn."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    recorded = config["base_model"]
    if base is None:
        base = load_base_model(recorded["id"], device=device, **recorded_hub_options(recorded))
    if base.architecture_fingerprint() != recorded["architecture_fingerprint"]:
        raise ModelError(
            f"{folder}: these adapters were trained for {recorded['class']} {recorded['id']!r} "
            f"(architecture {recorded['architecture_fingerprint']}), but the base given is "
            f"{type(base.net).__name__} {base.model_id!r} (architecture {base.architecture_fingerprint()}). "
            "Adapters only load into the architecture they were trained on."
        )
    if base.weights_fingerprint() != recorded["weights_fingerprint"]:
        dtypes = {recorded.get("dtype", "float32"), base.describe()["dtype"]}
        if len(dtypes) == 2 and "bfloat16" in dtypes:  # bf16 rounds differently: no fingerprint match
            message = (f"{folder}: adapters were trained on the base in {recorded.get('dtype')}, loaded now in "
                       f"{base.describe()['dtype']}; bfloat16 weights cannot be matched to the recorded "
                       "fingerprint, so a different checkpoint would go unnoticed here.")
        else:
            message = (f"{folder}: adapters were trained on weights {recorded['weights_fingerprint']} of "
                       f"{recorded['id']!r}; loading them into different weights {base.weights_fingerprint()} "
                       f"of the same architecture ({base.model_id!r}), e.g. a fine-tune. Guidance may "
                       "transfer imperfectly.")
        warnings.warn(message, stacklevel=2)
    return _load_weights(folder, base, config)


def _load_weights(folder: Path, base: BaseModel, config: dict) -> AdaptedModel:
    folder = Path(folder)
    problem = _adapter_config_problem(config)  # library callers may pass a config of their own
    if problem:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: {problem}; {retrain()}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: {ADAPTER_WEIGHTS} is missing (or not a file); re-run training "
                         f"(`{command_line('train')}`)")
    adapter_config = AdapterConfig(**config["adapter"])
    model = AdaptedModel(base, adapter_config)
    model.guidance_interval = check_interval((config.get("guidance") or {}).get("interval"), "interval")
    if model.target_names != config["placements"]:
        model.remove()
        raise ModelError(f"{folder / ADAPTER_CONFIG}: \"placements\" ({len(config['placements'])} layers) do not "
                         f"match the layers placement {adapter_config.placement!r} wraps in {base.model_id!r} "
                         f"({len(model.target_names)} layers); {retrain()}")
    data = weights.read_bytes()
    expected = (config.get(INTEGRITY) or {}).get("files", {}).get(ADAPTER_WEIGHTS)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        model.remove()
        raise ModelError(f"{weights}: its bytes differ from the sha256 recorded in {ADAPTER_CONFIG} (damaged, or "
                         "replaced by other weights since training wrote them); re-run training")
    try:
        state = {k: v.to(base.device) for k, v in load_safetensors(data).items()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
        model.remove()
        raise ModelError(f"{weights}: cannot read adapter weights ({err}); re-run training") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes differ from what the config describes
        model.remove()
        first = str(err).strip().splitlines()[-1].strip()
        raise ModelError(f"{weights}: does not match {ADAPTER_CONFIG} ({first[:200]}); the config was edited "
                         "or belongs to other weights: re-run training") from None
    if missing or unexpected:
        model.remove()
        raise ModelError(f"{weights}: does not match {ADAPTER_CONFIG} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); re-run training")
    return model.eval()
