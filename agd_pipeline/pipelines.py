"""AGD inside a diffusers pipeline: trained adapters on the user's own ``DiTPipeline``,
``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline``.

    adapters = AGDAdapters.from_pretrained("data/adapters")   # written by `python -m stages.train`, or a hub id
    with adapters.applied(pipe):                               # or adapters.apply(pipe) ... adapters.remove()
        image = pipe(prompt, negative_prompt="blurry", guidance_scale=7.5).images[0]

How: the pipelines batch CFG as two halves (DiT ``[cond, null]``, the SD family ``[uncond, cond]``)
and combine them as ``uncond + w * (cond - uncond)``. While applied, a forward pre-hook on the
pipeline's denoiser cuts every batched input of that call to the conditional half, so the denoiser
runs once on batch B, with the adapters conditioned on w, t and that half's class or prompt (and the
other half's negative prompt); a forward hook hands the output back for both halves, so the
pipeline's own arithmetic gives exactly the adapted output (y + w * (y - y) = y). Schedulers,
callbacks, output types, the VAE and attention kwargs stay the pipeline's. w comes from the call:
the pipeline's class is swapped for a subclass (same name) whose ``__call__`` records the call's
``guidance_scale``; the SD pipelines' own ``guidance_scale`` (which a step callback may change) is
read at each step. With guidance_scale <= 1 the pipelines do no CFG: the denoiser's batch is used as
it is, with the adapters conditioned on that w (at w = 1 their gate makes them exact no-ops).

The hooks act only inside a call of the applied pipeline: the denoiser called on its own (or by
another pipeline sharing it) is the base, untouched. ``remove()`` takes every hook off and gives the
pipeline its class back: it is then exactly the pipeline it was.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import families
from .adapters import ADAPTER_WEIGHTS, AdaptedModel, load_adapted_model, read_adapter_config
from .errors import ModelError, command_line
from .families import Family
from .hub import push_adapters, resolve_adapter_folder
from .models import BaseModel

# The denoisers that carry AGD hooks now, and whose: one set of adapters per denoiser.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, AGDAdapters] = weakref.WeakKeyDictionary()
# The per-pipeline-class subclasses whose __call__ records the call's guidance scale (built once each).
_CALL_RECORDING_CLASSES: dict[type, type] = {}
_ADAPTERS_ATTRIBUTE = "_agd_adapters"  # on an applied pipeline instance


# Text conditions whose unconditional half is the negative prompt's (adapters conditioned on
# "negative_text" read them as negative_<name>).
NEGATIVE_CONDITIONS = ("prompt_embeds", "pooled_prompt_embeds")


def pipeline_family(pipe) -> Family:
    """The family of a pipeline object (its class or a class it derives from); ModelError otherwise."""
    for klass in type(pipe).__mro__:
        family = families.from_pipeline(klass.__name__)
        if family is not None and type(family).condition_from_call is not Family.condition_from_call:
            return family
    raise ModelError(f"AGD adapters apply to {', '.join(f.pipelines[0] for f in families.FAMILIES)} "
                     f"(or subclasses); got {type(pipe).__name__}")


# ------------------------------------------------------------------------------------ the adapters


@dataclass
class _Call:
    """One call of the applied pipeline: the guidance scale it was called with."""

    guidance_scale: object


@dataclass
class _Step:
    """One denoiser call in progress: the adapters' condition is set until it returns."""

    context: contextlib.AbstractContextManager
    duplicate: bool  # hand the output back for both CFG halves


class AGDAdapters:
    """Trained AGD adapters (an adapter folder of ``python -m stages.train``), to put on a diffusers
    pipeline of the architecture they were trained on: :meth:`apply` / :meth:`remove`, or the
    context manager :meth:`applied`. One pipeline at a time; load the folder again for another."""

    def __init__(self, folder: str | Path, config: dict):
        self.folder = Path(folder)
        self.config = config
        self.pipeline = None  # the pipeline the adapters are applied to, or None
        self.model: AdaptedModel | None = None  # the adapters on that pipeline's denoiser
        self._family: Family | None = None
        self._net: nn.Module | None = None
        self._original_class: type | None = None
        self._handles: list = []
        self._call: _Call | None = None
        self._step: _Step | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, subfolder: str | None = None,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False) -> AGDAdapters:
        """Read and check an adapter folder (adapter_config.json + adapters.safetensors): a local
        folder, or a hub id (``namespace/name``) with the ``revision``, ``subfolder``, ``token``,
        ``cache_dir`` and ``local_files_only`` of diffusers' loaders, through the hub cache
        (:mod:`agd_pipeline.hub`). The weights load onto the denoiser in :meth:`apply`, on its device."""
        folder = resolve_adapter_folder(pretrained_model_name_or_path, revision=revision, subfolder=subfolder,
                                        token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        config = read_adapter_config(folder)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise ModelError(f"{folder}: {ADAPTER_WEIGHTS} is missing (or not a file); re-run training "
                             f"(`{command_line('train')}`)")
        return cls(folder, config)

    def push_to_hub(self, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                    revision: str | None = None, path_in_repo: str | None = None,
                    commit_message: str = "Upload AGD adapters", create_pr: bool = False,
                    include_validation: bool = True, api=None):
        """Publish these adapters' folder to the hub repository ``repo_id`` (created if missing): the
        weights and config (verified first), the model card naming ``repo_id`` and the newest validation
        grid; never lock files, checkpoints or logs. Returns the hub's ``CommitInfo``. Load it back with
        ``AGDAdapters.from_pretrained(repo_id, subfolder=path_in_repo)``."""
        return push_adapters(self.folder, repo_id, token=token, private=private, revision=revision,
                             path_in_repo=path_in_repo, commit_message=commit_message, create_pr=create_pr,
                             include_validation=include_validation, api=api)

    # -- what the folder records --------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config["base_model"].get("family") or ""

    @property
    def negative_prompt(self) -> str | None:
        """The negative prompt of the CFG the adapters were distilled from, or None where that was the
        pipeline's default (pass it on as it is: SDXL gives "" and None different meanings)."""
        return self.config.get("negative_prompt") or None

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """The w range the adapters were trained on (None if the folder does not record it)."""
        guidance = self.config.get("guidance")
        return (guidance["min"], guidance["max"]) if guidance else None

    @property
    def num_steps(self) -> int | None:
        """The sampling steps of the distilled trajectories (None if not recorded)."""
        return (self.config.get("sampler") or {}).get("num_steps")

    def __repr__(self) -> str:
        where = f"applied to {type(self.pipeline).__name__}" if self.pipeline is not None else "not applied"
        return f"<AGDAdapters {str(self.folder)!r} for {self.config['base_model']['id']!r}, {where}>"

    # -- apply and remove -----------------------------------------------------------------------
    def apply(self, pipe):
        """Put the adapters on ``pipe``; returns ``pipe``. A pipeline of another architecture than
        the adapters were trained on is refused (ModelError); other weights of the same architecture
        (a fine-tune) warn. Applying again to the same pipeline changes nothing; a pipeline (or
        denoiser) that carries other AGD adapters is refused. Nothing is left behind on failure."""
        if self.pipeline is pipe:
            return pipe  # idempotent
        if self.pipeline is not None:
            raise ModelError(f"these adapters are applied to another {type(self.pipeline).__name__}: "
                             "remove() them there first, or load the folder again for a second pipeline")
        family = pipeline_family(pipe)
        other = pipe.__dict__.get(_ADAPTERS_ATTRIBUTE)
        if other is not None:
            raise ModelError(f"this {type(pipe).__name__} already carries AGD adapters ({other.folder}): "
                             "remove() them first")
        if self.family and self.family != family.name:
            raise ModelError(f"{self.folder}: these adapters were trained for a {families.get(self.family).title} "
                             f"model ({self.config['base_model']['id']!r}), not for a {type(pipe).__name__}")
        net = getattr(pipe, family.denoiser_folder, None)
        if not isinstance(net, nn.Module):
            raise ModelError(f"this {type(pipe).__name__} has no {family.denoiser_folder} to put the adapters on")
        if net in _APPLIED:
            raise ModelError(f"the {family.denoiser_folder} of this {type(pipe).__name__} already carries AGD "
                             f"adapters ({_APPLIED[net].folder}), applied through another pipeline: remove() them "
                             "first")
        base = _base_around(pipe, family, net)
        # Refuses another architecture, warns on other weights; leaves no hooks behind if it fails.
        model = load_adapted_model(self.folder, base)
        try:
            self._handles = [
                net.register_forward_pre_hook(self._before_denoiser, with_kwargs=True),
                # always_call: the adapters' condition is cleared even when the denoiser raises
                net.register_forward_hook(self._after_denoiser, with_kwargs=True, always_call=True),
            ]
            self._original_class = type(pipe)
            pipe.__class__ = _call_recording_class(type(pipe))
            pipe.__dict__[_ADAPTERS_ATTRIBUTE] = self
            _APPLIED[net] = self
        except BaseException:
            self._undo(pipe, net, model)
            raise
        self.pipeline, self.model, self._family, self._net = pipe, model, family, net
        return pipe

    def remove(self) -> None:
        """Take the adapters off their pipeline: it is then exactly as it was before :meth:`apply`
        (its own CFG, two evaluations per step). Does nothing when the adapters are not applied."""
        if self.pipeline is None:
            return
        pipe, net, model = self.pipeline, self._net, self.model
        self.pipeline = self.model = self._family = self._net = None
        self._undo(pipe, net, model)

    @contextlib.contextmanager
    def applied(self, pipe):
        """``with adapters.applied(pipe): pipe(...)``: the adapters are on ``pipe`` inside the block only."""
        self.apply(pipe)
        try:
            yield pipe
        finally:
            self.remove()

    def _undo(self, pipe, net, model) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if model is not None:
            model.remove()
        if self._original_class is not None and type(pipe) is _CALL_RECORDING_CLASSES.get(self._original_class):
            pipe.__class__ = self._original_class
        self._original_class = None
        if pipe.__dict__.get(_ADAPTERS_ATTRIBUTE) is self:
            del pipe.__dict__[_ADAPTERS_ATTRIBUTE]
        if net is not None and _APPLIED.get(net) is self:
            del _APPLIED[net]
        self._call = self._step = None

    # -- during a pipeline call -----------------------------------------------------------------
    def _run(self, pipe, call, args: tuple, kwargs: dict):
        """The pipeline's own ``__call__``, with the call's guidance scale recorded for the hooks."""
        net = getattr(pipe, self._family.denoiser_folder, None)
        if net is not self._net:
            raise ModelError(f"pipe.{self._family.denoiser_folder} was replaced after the AGD adapters were applied: "
                             "remove() them and apply them again")
        try:
            bound = inspect.signature(call).bind(pipe, *args, **kwargs)
        except TypeError:
            return call(pipe, *args, **kwargs)  # the pipeline reports its own argument errors
        bound.apply_defaults()
        recorded = (self.config.get("sampler") or {}).get("scheduler")
        if recorded and type(pipe.scheduler).__name__ != recorded:
            warnings.warn(f"{self.folder}: the pipeline samples with {type(pipe.scheduler).__name__}, but the adapters "
                          f"were distilled from {recorded} trajectories; they may reproduce CFG less closely with "
                          f"another sampler (pipe.scheduler = {recorded}.from_config(pipe.scheduler.config))",
                          stacklevel=3)
        outer, self._call = self._call, _Call(bound.arguments.get("guidance_scale"))
        try:
            return call(pipe, *args, **kwargs)
        finally:
            self._call = outer

    def _guidance(self, pipe) -> tuple[float, bool]:
        """(w, whether the pipeline batches CFG's two halves now). The SD pipelines hold both during
        a call (a step callback may change them); DiTPipeline only has its argument."""
        if isinstance(inspect.getattr_static(type(pipe), "do_classifier_free_guidance", None), property):
            w, guided = pipe.guidance_scale, bool(pipe.do_classifier_free_guidance)
        else:
            w = self._call.guidance_scale
            guided = None
        try:
            value = float(w)
        except (TypeError, ValueError, RuntimeError):
            value = math.nan
        if not math.isfinite(value):
            raise ModelError(f"AGD adapters: guidance_scale must be a finite number (got {w!r})")
        return value, value > 1 if guided is None else guided

    def _before_denoiser(self, net, args: tuple, kwargs: dict):
        self._step = None
        if self._call is None or self.model is None:
            return None  # the denoiser called on its own: the base, untouched
        if kwargs.get("skip_layers") is not None:
            return None  # SD3's skip-layer guidance branch: the base's own prediction
        pipe, family = self.pipeline, self._family
        w, guided = self._guidance(pipe)
        signature = inspect.signature(type(net).forward)
        sample_name = list(signature.parameters)[1]  # after self: the noisy latents
        full = signature.bind(net, *args, **kwargs).arguments
        x = full[sample_name]
        if guided:
            batch = x.shape[0]
            half = batch // 2
            if batch % 2 or not torch.equal(x[:half], x[half:]):
                raise ModelError(f"AGD adapters: {type(pipe).__name__} called its {family.denoiser_folder} with a "
                                 f"batch of {batch} that is not CFG's two equal halves; this pipeline call is not "
                                 "supported with the adapters applied (remove() them for it)")
            keep, other = (slice(0, half), slice(half, batch)) if family.cond_first else (slice(half, batch),
                                                                                           slice(0, half))
            args, kwargs = _cut(args, batch, keep), _cut(kwargs, batch, keep)
        call = signature.bind(net, *args, **kwargs).arguments
        x = call[sample_name]
        cond = family.condition_from_call(call)
        if family.conditioning == "text":
            # the unconditional half is the negative prompt's embeddings (or the pipeline's default);
            # without CFG there is none: zeros (the adapters' gate silences them at w = 1)
            uncond = family.condition_from_call(full) if guided else None
            for name in NEGATIVE_CONDITIONS:
                if name in cond:
                    cond[f"negative_{name}"] = (uncond[name][other] if guided
                                                else torch.zeros_like(cond[name]))
        model = self.model
        if next(model.parameters()).device != x.device:  # the pipeline moved (pipe.to, offloading)
            model.to(x.device)
        condition, _ = model.embed(x, call["timestep"], cond, w)
        context = model.conditioned(condition)
        context.__enter__()
        self._step = _Step(context, duplicate=guided)
        return args, kwargs

    def _after_denoiser(self, net, args, kwargs, output):
        step, self._step = self._step, None
        if step is None:
            return None
        step.context.__exit__(None, None, None)
        if output is None or not step.duplicate:
            return None
        return _both_halves(output)


def _base_around(pipe, family: Family, net: nn.Module) -> BaseModel:
    """A BaseModel over the pipeline's own denoiser (for the fingerprints and the adapter targets)."""
    config = net.config
    sample_size = config.get("sample_size", 0) or 0
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    name = pipe.config.get("_name_or_path") or f"{type(pipe).__name__} object"
    return BaseModel(net=net, scheduler=getattr(pipe, "scheduler", None), family=family.name,
                     model_id=str(name), num_classes=family.num_classes(config),
                     latent_channels=int(config.get("in_channels", 0) or 0), sample_size=int(sample_size),
                     info={"vae_scale_factor": int(getattr(pipe, "vae_scale_factor", 1) or 1)})


def _cut(value, batch: int, keep: slice):
    """Every tensor with the CFG batch as its first dimension, cut to ``keep``; nested dicts, lists
    and tuples (added_cond_kwargs, IP-Adapter or ControlNet inputs) likewise; the rest unchanged."""
    if isinstance(value, torch.Tensor):
        return value[keep] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return type(value)({key: _cut(item, batch, keep) for key, item in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_cut(item, batch, keep) for item in value)
    return value


def _both_halves(output):
    """The denoiser's output on batch B, handed back as the CFG batch 2B: both halves equal."""
    if isinstance(output, torch.Tensor):
        return torch.cat([output, output])
    if isinstance(output, tuple):
        return type(output)(_both_halves(item) if isinstance(item, torch.Tensor) else item for item in output)
    if isinstance(output, dict):  # diffusers' BaseOutput (UNet2DConditionOutput, Transformer2DModelOutput)
        return type(output)(**{key: _both_halves(item) if isinstance(item, torch.Tensor) else item
                               for key, item in output.items()})
    raise ModelError(f"AGD adapters: cannot hand back a denoiser output of type {type(output).__name__}")


def _call_recording_class(cls: type) -> type:
    """A subclass of the pipeline class, with the same name, whose ``__call__`` lets the applied
    adapters see the call's guidance scale. Built once per pipeline class."""
    if cls not in _CALL_RECORDING_CLASSES:
        call = cls.__call__

        @functools.wraps(call)
        def __call__(self, *args, **kwargs):
            adapters = self.__dict__.get(_ADAPTERS_ATTRIBUTE)
            if adapters is None:  # e.g. a copy of an applied pipeline
                return call(self, *args, **kwargs)
            return adapters._run(self, call, args, kwargs)

        _CALL_RECORDING_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__})
    return _CALL_RECORDING_CLASSES[cls]
