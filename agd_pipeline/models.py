"""Base models behind one small interface.

``load_base_model`` takes a local diffusers folder or a hub id, detects the family from the
pipeline's ``model_index.json`` (or the denoiser's class), and returns a :class:`BaseModel` with
``predict(x_t, t, cond)``, the null condition, the latent shape, the prediction type and the
scheduler. Sampling, recording, training and evaluation only ever talk to this interface.

A *condition* is a dict of batched tensors, exactly what the denoiser needs besides x_t and t:

  * ``dit``   (DiTPipeline):                 ``class_label``
  * ``sd``    (StableDiffusionPipeline, 1.x/2.x): ``prompt_embeds``
  * ``sdxl``  (StableDiffusionXLPipeline):   ``prompt_embeds``, ``pooled_prompt_embeds``, ``add_time_ids``
  * ``sd3``   (StableDiffusion3Pipeline):    ``prompt_embeds``, ``pooled_prompt_embeds``

Text conditions come from the pipeline's own ``encode_prompt`` (:func:`encode_prompts`), once per
prompt; the store keeps them, so stage two never loads a text encoder.

Everything that differs between families lives in :mod:`agd_pipeline.families` (one module each);
``BaseModel.spec`` is its family there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import families
from .errors import ConfigError, ModelError
from .families import Family


@dataclass(eq=False)
class BaseModel:
    """A frozen diffusion model plus everything needed to sample from it."""

    net: nn.Module
    scheduler: object
    family: str
    model_id: str
    num_classes: int
    latent_channels: int
    sample_size: int
    vae: nn.Module | None = None
    info: dict = field(default_factory=dict)

    @property
    def spec(self) -> Family:
        """The family: everything family-specific (conditions, denoiser call, adapter targets)."""
        return families.get(self.family)

    # -- conditions -------------------------------------------------------------------------
    @property
    def conditioning(self) -> str:
        """"class" (a class id per sample) or "text" (prompt embeddings per sample)."""
        return self.spec.conditioning

    @property
    def null_class(self) -> int:
        """Label of the unconditional branch: DiT's label table has one extra row at the end."""
        return self.num_classes

    @property
    def cond_first(self) -> bool:
        """DiT batches [cond, null]; the SD family batches [uncond, cond]."""
        return self.spec.cond_first

    def class_condition(self, class_labels: torch.Tensor) -> dict:
        return {"class_label": class_labels}

    def check_classes(self, classes, key: str) -> None:
        """Refuse class ids the model does not have, naming the setting ``key``."""
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise ConfigError(f"{key}: {bad[:5]} are not classes of the base model (0..{self.num_classes - 1})")

    def as_condition(self, cond) -> dict:
        """A condition dict; class-conditional models also take a tensor of class ids."""
        if isinstance(cond, dict):
            return cond
        if self.conditioning == "class":
            return self.class_condition(torch.as_tensor(cond))
        raise TypeError(f"a {self.family} model needs a condition dict ({', '.join(self.condition_names)})")

    @property
    def condition_names(self) -> tuple[str, ...]:
        return self.spec.condition_names

    def null_condition(self, cond: dict) -> dict:
        """The unconditional branch's condition. Text models have none of their own: their
        negative-prompt embeddings (from :func:`encode_prompts`) are passed as ``uncond``."""
        if self.conditioning == "class":
            return {"class_label": torch.full_like(cond["class_label"], self.null_class)}
        raise ValueError("text models need the negative-prompt condition (encode_prompts) for CFG")

    # -- outputs ----------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        if "FlowMatch" in type(self.scheduler).__name__:
            return "flow"
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def learned_sigma(self) -> bool:
        out = getattr(self.net.config, "out_channels", None) or self.latent_channels
        return out == 2 * self.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.sample_size, self.sample_size)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (recorded when loading, even if the VAE itself was skipped)."""
        return int(self.info.get("vae_scale_factor", 1))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def to(self, device) -> BaseModel:
        self.net.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def _inputs(self, cond: dict) -> dict:
        """Conditions on the model's device; floating ones in its dtype (the store keeps fp16)."""
        out = {}
        for name, value in cond.items():
            value = torch.as_tensor(value).to(self.device)
            out[name] = value.to(self.dtype) if value.is_floating_point() else value
        return out

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One network evaluation: the full output (prediction and, if learned, sigma channels)."""
        t = _batch_timesteps(t, x)
        x = x.to(self.dtype)
        c = self._inputs(self.as_condition(cond))
        return self.spec.predict(self.net, x, t, c)

    def prediction_channels(self, output: torch.Tensor) -> torch.Tensor:
        """The channels the sampler steps with (learned-sigma models also output a variance)."""
        return output[:, : self.latent_channels]

    def cfg_predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance_scale: torch.Tensor,
                    uncond: dict | None = None):
        """Classifier-free guidance in one batched call with a per-sample scale.

        ``uncond`` defaults to the null class (class models); text models pass their negative-prompt
        condition, with batch 1 (shared) or one row per sample. Returns (guided, cond, uncond)
        prediction channels, guided = uncond + w * (cond - uncond): learned-sigma models are guided
        on the prediction channels only, as the diffusers pipelines do.
        """
        batch = x.shape[0]
        cond = self.as_condition(cond)
        uncond = self.null_condition(cond) if uncond is None else self.as_condition(uncond)
        halves = (cond, uncond) if self.cond_first else (uncond, cond)
        joined = {}
        for name in self.condition_names:
            first, second = (torch.as_tensor(h[name]).to(x.device) for h in halves)
            first, second = (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for v in (first, second))
            joined[name] = torch.cat([first, second])
        t = _batch_timesteps(t, x)
        out = self.prediction_channels(self.predict(torch.cat([x, x]), torch.cat([t, t]), joined))
        first, second = out[:batch], out[batch:]
        cond_out, uncond_out = (first, second) if self.cond_first else (second, first)
        # the combination in float32 with the exact w the adapters are conditioned on (w rounded to
        # float16 would shift a half-precision target by up to ~0.1 % of w)
        w = guidance_scale.to(torch.float32).view(-1, *([1] * (out.dim() - 1)))
        guided = uncond_out.float() + w * (cond_out.float() - uncond_out.float())
        return guided.to(out.dtype), cond_out, uncond_out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]. Pixel-space models return the latents themselves."""
        if self.vae is None:
            return latents
        scale = self.vae.config.get("scaling_factor", 1.0) or 1.0
        shift = self.vae.config.get("shift_factor", None) or 0.0  # SD3's VAE latents are shifted
        # VAEs marked force_upcast (SDXL's) overflow in float16: decode in float32, as the pipelines do
        upcast = self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        dtype = self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        try:
            latents = latents.to(self.vae.dtype) / scale + shift
            return self.vae.decode(latents).sample.clamp(-1, 1)
        finally:
            if upcast:
                self.vae.to(dtype)

    # -- identity ---------------------------------------------------------------------------
    def architecture_fingerprint(self) -> str:
        """Hash of the denoiser's class, config and parameter shapes: equal for fine-tunes."""
        config = {k: v for k, v in dict(self.net.config).items() if not k.startswith("_")}
        shapes = [(n, list(p.shape)) for n, p in self.net.state_dict().items()]
        blob = json.dumps([type(self.net).__name__, config, shapes], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weights_fingerprint(self) -> str:
        """Hash of the denoiser's weights: differs between checkpoints of one architecture.

        Floating weights are hashed as float16, so one checkpoint loaded in float32 or float16 has
        one fingerprint (bfloat16 rounds differently and gets its own)."""
        if "weights_fingerprint" not in self.info:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.net.state_dict().items()):
                digest.update(name.encode())
                tensor = tensor.detach().cpu()
                if tensor.is_floating_point():
                    tensor = tensor.to(torch.float16)
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            self.info["weights_fingerprint"] = digest.hexdigest()[:16]
        return self.info["weights_fingerprint"]

    @property
    def hub_options(self) -> dict:
        """The revision and variant the base was loaded with (only those given)."""
        return dict(self.info.get("hub", {}))

    def describe(self) -> dict:
        """What the store manifest and adapter config record about the base. A revision or
        variant is recorded only when one was given, so records of plain loads stay as they were."""
        return {
            "id": self.model_id,
            "family": self.family,
            "conditioning": self.conditioning,
            "class": type(self.net).__name__,
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "prediction_type": self.prediction_type,
            "learned_sigma": self.learned_sigma,
            "dtype": str(self.dtype).removeprefix("torch."),
            "architecture_fingerprint": self.architecture_fingerprint(),
            "weights_fingerprint": self.weights_fingerprint(),
            "parameters": count_parameters(self.net),
            **self.hub_options,
        }


def recorded_hub_options(recorded: dict) -> dict:
    """The revision and variant a record of ``describe()`` says the base was loaded with."""
    return {k: recorded[k] for k in ("revision", "variant") if recorded.get(k)}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t[None]
    return t.expand(x.shape[0]) if t.shape[0] == 1 else t


def copy_scheduler(scheduler):
    """Schedulers hold per-run state (timesteps, multistep history): never share one between runs.

    deepcopy rather than from_config, which can change settings such as steps_offset.
    """
    return copy.deepcopy(scheduler)


# --------------------------------------------------------------------------------------- saving


def save_dit_folder(folder, net: nn.Module, scheduler, meta: dict | None = None) -> Path:
    """Write a pixel-space DiT as a diffusers folder that ``load_base_model`` (and DiTPipeline's
    layout) understands: model_index.json, transformer/, scheduler/, and optional agd_base.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder / "transformer")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", type(net).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "vae": [None, None],
    }, indent=2) + "\n")
    if meta is not None:
        (folder / "agd_base.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------- loading


def _read_model_index(name: str, revision: str | None = None) -> dict | None:
    path = Path(name)
    if path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else None
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(name, revision=revision))
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes
        raise ModelError(
            f"base model {name!r}: not a local folder, and loading it as a hub id failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give a local diffusers "
            "folder (e.g. pretrained/toy-dit, the shipped class default) or a hub id you can reach."
        ) from None


def _component_class(name: str, index: dict | None, component: str) -> str | None:
    if index and component in index and index[component] and index[component][1]:
        return index[component][1]
    for config_file in ("config.json", "scheduler_config.json"):  # models / schedulers
        path = Path(name) / component / config_file
        if path.exists():
            return json.loads(path.read_text()).get("_class_name")
    return None


def _diffusers_class(class_name: str, what: str, name: str):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelError(f"base model {name!r}: {what} class {class_name!r} is not known to diffusers "
                         f"{diffusers.__version__}")
    return cls


def _detect_family(name: str, index: dict | None) -> tuple[Family, str]:
    """The family (from the registry) and the denoiser class of a folder, before anything loads."""
    denoisers = {c: _component_class(name, index, c) for c in families.DENOISER_FOLDERS}
    pipeline_class = (index or {}).get("_class_name")
    family = families.detect(pipeline_class, denoisers.values())
    if family is None:
        found = pipeline_class or next((c for c in denoisers.values() if c), None)
        folders = " or ".join(f"{c}/" for c in denoisers)
        raise ModelError(
            f"base model {name!r}: unsupported model ({found or f'no model_index.json and no {folders} folder'}). "
            f"Supported families: {families.supported()}."
        )
    if not denoisers[family.denoiser_folder]:
        raise ModelError(f"base model {name!r}: a {pipeline_class or family.name} model needs a "
                         f"{family.denoiser_folder}/ component, found none; is the folder complete?")
    return family, denoisers[family.denoiser_folder]


def load_base_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    scheduler: str = "", with_vae: bool = True, revision: str = "", variant: str = "") -> BaseModel:
    """Load a base model by local folder or hub id.

    ``scheduler`` optionally swaps the scheduler class (any diffusers scheduler the pipeline accepts);
    ``with_vae=False`` skips the decoder (stage two never decodes). Text encoders are never loaded
    here: :func:`encode_prompts` loads them when prompts need encoding. ``revision`` (a hub branch,
    tag or commit) and ``variant`` (weights saved as ``*.fp16.safetensors`` and the like) are
    diffusers' own options, recorded with the base so later stages load the same weights.
    """
    hub = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
    # -- where it is, and which family (from model_index.json or the denoiser's class) ----------
    if not name:
        raise ModelError("no base model given: set generate.base_model to a diffusers folder or hub id")
    path = Path(name)
    # A hub id is "org/name"; anything else that is not an existing folder is a wrong path.
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not path.is_dir() and (path.exists() or not looks_like_hub_id):
        raise ModelError(
            f"base model {name!r}: no such folder. Give a diffusers model folder or a hub id like "
            "'facebook/DiT-XL-2-256' (in the repository, the embedded defaults ship in pretrained/; "
            "`python -m stages.base` rebuilds the class default)."
        )
    index = _read_model_index(name, revision or None)
    family, net_class_name = _detect_family(name, index)

    # -- the denoiser, frozen and in eval() (DiT's label embedding drops labels in train mode) ----
    denoiser = family.denoiser_folder
    net_class = _diffusers_class(net_class_name, "denoiser", name)
    net = load_component(net_class, name, denoiser, dtype, hub)
    net.requires_grad_(False).eval()
    config = net.config
    family = families.refine(family, config)  # e.g. a bare SDXL UNet folder without model_index.json

    # -- scheduler and (optionally) the VAE ---------------------------------------------------------
    sched_class_name = scheduler or _component_class(name, index, "scheduler")
    if not sched_class_name:
        raise ModelError(f"base model {name!r}: has no scheduler/ folder")
    scheduler_obj = _diffusers_class(sched_class_name, "scheduler", name).from_pretrained(
        name, subfolder="scheduler", **({"revision": revision} if revision else {}))
    vae, vae_scale_factor = _load_vae(name, index, dtype, with_vae, hub)

    sample_size = config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    agd_meta = path / "agd_base.json"
    extra = json.loads(agd_meta.read_text()) if agd_meta.exists() else {}
    model = BaseModel(
        net=net,
        scheduler=scheduler_obj,
        family=family.name,
        model_id=str(name),
        num_classes=family.num_classes(config),
        latent_channels=int(config.in_channels),
        sample_size=int(sample_size),
        vae=vae,
        info={"meta": extra, "vae_scale_factor": vae_scale_factor, "hub": hub},
    )
    return model.to(device)


PICKLE_ENV = "AGD_ALLOW_PICKLE_WEIGHTS"


def load_component(cls, name: str, subfolder: str, dtype: torch.dtype, hub: dict) -> nn.Module:
    """``cls.from_pretrained(name, subfolder=...)`` from safetensors only (pickle files can run code
    when loaded: they load only with AGD_ALLOW_PICKLE_WEIGHTS=1), refused with one ModelError when
    the folder's config.json does not fit its weights (a layer more: diffusers would fail deep
    inside; a layer fewer: it would load the model truncated, with a log line at most)."""
    pickles = os.environ.get(PICKLE_ENV, "").strip() == "1"
    where = f"base model {name!r}: {subfolder}"
    misfit = f"{where}/config.json does not fit its weights: {{}}; the config was edited or belongs to other weights"
    try:
        net, info = cls.from_pretrained(name, subfolder=subfolder, dtype=dtype, output_loading_info=True,
                                        use_safetensors=None if pickles else True, **hub)
    except (OSError, ValueError) as err:
        local = Path(name) / subfolder
        found = sorted(p.name for p in local.glob("*.bin")) if local.is_dir() else []
        if found and not pickles and not list(local.glob("*.safetensors")):
            raise ModelError(f"{where}/ has no safetensors weights, only pickle files ({', '.join(found[:2])}), which "
                             f"can run code when loaded; convert them to safetensors, or set {PICKLE_ENV}=1 to load "
                             "them with torch's weights-only loader") from None
        problem = _weights_misfit(cls, local, hub.get("variant"))
        raise ModelError(misfit.format(problem) if problem else
                         f"base model {name!r}: cannot load its {subfolder}: {_first_line(err)}") from None
    except (NotImplementedError, RuntimeError):  # diffusers fails deep inside on tensors the weights lack
        problem = _weights_misfit(cls, Path(name) / subfolder, hub.get("variant"))
        if problem is None:
            raise  # not a misfit (out of memory, or a bug): keep it as it is
        raise ModelError(misfit.format(problem)) from None
    # what diffusers itself matched, after its own conversions of older checkpoints' key names
    ignored = [re.compile(p) for p in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not any(p.search(k) for p in ignored))
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelError(misfit.format(f"the weights lack {len(missing)} tensors the config asks for (e.g. "
                                       f"{missing[0]})"))
    if unexpected:
        raise ModelError(misfit.format(f"the config has no place for {len(unexpected)} tensors of the weights (e.g. "
                                       f"{unexpected[0]})"))
    return net


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _weights_misfit(cls, folder: Path, variant: str | None) -> str | None:
    """What the safetensors weights in a local ``folder`` and the model its config.json describes
    disagree on (tensor names), or None (they agree, or there is nothing local to compare). Used to
    explain a load that failed: a successful one is judged by diffusers' own loading info."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    suffix = f".{variant}" if variant else ""
    single, index = folder / f"diffusion_pytorch_model{suffix}.safetensors", folder / (
        f"diffusion_pytorch_model.safetensors.index{suffix}.json")
    try:
        if single.is_file():
            with safe_open(single, "pt") as f:
                stored = set(f.keys())
        elif index.is_file():
            stored = set(json.loads(index.read_text())["weight_map"])
        else:
            return None
        with init_empty_weights():
            expected = set(cls.from_config(cls.load_config(folder)).state_dict())
    except Exception:  # noqa: BLE001 - an unreadable file is diffusers' error to report, not this check's
        return None
    ignored = [re.compile(p) for p in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(k for k in stored - expected if not any(p.search(k) for p in ignored))
    missing = sorted(expected - stored)
    if missing:
        return f"the weights lack {len(missing)} tensors the config asks for (e.g. {missing[0]})"
    if unexpected:
        return f"the config has no place for {len(unexpected)} tensors of the weights (e.g. {unexpected[0]})"
    return None


def attach_decoder(base: BaseModel) -> BaseModel:
    """Load the VAE into a base loaded without it (``with_vae=False``, as stage two does), once, in
    the base's dtype and on its device: what decoding validation images needs, without a second
    copy of the denoiser."""
    if base.vae is None:
        hub = base.hub_options
        base.vae, _ = _load_vae(base.model_id, _read_model_index(base.model_id, hub.get("revision")), base.dtype,
                                True, hub)
        if base.vae is not None:
            base.vae.to(base.device)
    return base


def _load_vae(name: str, index: dict | None, dtype: torch.dtype, with_vae: bool, hub: dict):
    """(the VAE or None, pixels per latent cell). The scale factor is read from the VAE's config
    even when the VAE itself is skipped; a pixel-space model has neither (factor 1)."""
    vae_class_name = _component_class(name, index, "vae")
    if not vae_class_name:
        return None, 1
    vae_class = _diffusers_class(vae_class_name, "vae", name)
    revision = {"revision": hub["revision"]} if "revision" in hub else {}
    config = vae_class.load_config(name, subfolder="vae", **revision)
    vae_scale_factor = 2 ** (len(config["block_out_channels"]) - 1)
    if not with_vae:
        return None, vae_scale_factor
    vae = load_component(vae_class, name, "vae", dtype, hub)
    vae.requires_grad_(False).eval()
    return vae, vae_scale_factor


# --------------------------------------------------------------------------------- text prompts


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"prompt file {str(path)!r} not found: give a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise ModelError(f"prompt file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}): give a "
                         "text file with one prompt per line") from None
    if not prompts:
        raise ModelError(f"prompt file {str(path)!r} holds no prompts (one per line)")
    return prompts


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str], negative_prompt: str | list[str] = "", batch_size: int = 16,
                   progress: bool = False) -> tuple[dict, dict]:
    """Encode prompts with the pipeline's own text encoders (its ``encode_prompt``), once each.

    Returns (conditions with one row per prompt, the negative prompt's condition with one row), as
    CPU tensors keyed like :meth:`BaseModel.predict` expects. An empty negative prompt means the
    pipeline's default (SDXL then uses zeros, as its pipeline does). ``negative_prompt`` may also be
    a list: the negative conditions then have one row per entry, each distinct one encoded once, as
    the pipeline encodes a negative prompt ("" is again the pipeline's default).
    """
    if base.conditioning != "text":
        raise ModelError(f"{base.model_id!r} is class-conditional: it takes class ids, not prompts")
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    denoiser = base.spec.denoiser_folder
    # Components the folder records as absent (SD3 without its T5 encoder) must be passed as None;
    # the denoiser we already hold is handed over, and the VAE skipped: only text encoders load.
    index = _read_model_index(base.model_id, base.hub_options.get("revision")) or {}
    absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[:1] == [None]}
    try:
        pipe = DiffusionPipeline.from_pretrained(base.model_id, **{**absent, denoiser: base.net, "vae": None},
                                                 **base.hub_options,
                                                 dtype=base.dtype)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"base model {base.model_id!r}: cannot load its text encoders ({err})") from None
    pipe.to(base.device)
    several = isinstance(negative_prompt, list)
    negative = None if several else negative_prompt or None
    cond_parts: dict[str, list] = {}
    uncond = None
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in tqdm(chunks, desc="encode prompts", unit="batch", disable=not progress):
        cond, neg = base.spec.encode_prompt(pipe, base, chunk, negative)
        for name, value in cond.items():
            cond_parts.setdefault(name, []).append(value.cpu())
        if uncond is None:
            uncond = {name: value[:1].cpu() for name, value in neg.items()}
    if several:  # uncond above is the pipeline's default; every other negative prompt once, as a negative
        distinct = [text for text in dict.fromkeys(negative_prompt) if text]
        rows = {"": uncond}
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start:start + batch_size]
            _, neg = base.spec.encode_prompt(pipe, base, chunk, chunk)
            rows.update({text: {name: value[i:i + 1].cpu() for name, value in neg.items()}
                         for i, text in enumerate(chunk)})
        uncond = {name: torch.cat([value[:0], *(rows[text][name] for text in negative_prompt)])
                  for name, value in uncond.items()}
    del pipe
    return {name: torch.cat(parts) for name, parts in cond_parts.items()}, uncond
