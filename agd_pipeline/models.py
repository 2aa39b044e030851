"""Base models behind one small interface.

``load_base_model`` takes a local diffusers folder or a hub id, detects the family from the
pipeline's ``model_index.json`` (or the component folders), and returns a :class:`BaseModel` with
``predict(x_t, t, cond)``, the null condition, the latent shape, the prediction type and the
scheduler. Sampling, recording, training and evaluation only ever talk to this interface.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError

# Pipeline class -> (family, denoiser component). The family decides how conditions are fed.
PIPELINE_FAMILIES = {
    "DiTPipeline": ("dit", "transformer"),
}
DENOISER_FAMILIES = {
    "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "dit",  # the hub's DiT-XL/2 checkpoints name their transformer this way
}
SUPPORTED = "class-conditional DiT (DiTPipeline / DiTTransformer2DModel)"


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

    # -- conditions -------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        """Label of the unconditional branch: DiT's label table has one extra row at the end."""
        return self.num_classes

    @property
    def cond_first(self) -> bool:
        """DiT batches [cond, null]; the SD family batches [uncond, cond]."""
        return True

    # -- outputs ----------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def learned_sigma(self) -> bool:
        out = getattr(self.net.config, "out_channels", None) or self.latent_channels
        return out == 2 * self.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.sample_size, self.sample_size)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def to(self, device) -> "BaseModel":
        self.net.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def predict(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """One network evaluation: the full output (prediction and, if learned, sigma channels)."""
        t = _batch_timesteps(t, x)
        return self.net(x, timestep=t, class_labels=class_labels).sample

    def prediction_channels(self, output: torch.Tensor) -> torch.Tensor:
        """The channels the sampler steps with (learned-sigma models also output a variance)."""
        return output[:, : self.latent_channels]

    def cfg_predict(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor,
                    guidance_scale: torch.Tensor):
        """Classifier-free guidance in one batched call with a per-sample scale.

        Returns (guided, cond, uncond) prediction channels. guided = uncond + w * (cond - uncond).
        """
        batch = x.shape[0]
        null = torch.full_like(class_labels, self.null_class)
        labels = torch.cat([class_labels, null] if self.cond_first else [null, class_labels])
        t = _batch_timesteps(t, x)
        out = self.prediction_channels(self.predict(torch.cat([x, x]), torch.cat([t, t]), labels))
        first, second = out[:batch], out[batch:]
        cond, uncond = (first, second) if self.cond_first else (second, first)
        w = guidance_scale.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return uncond + w * (cond - uncond), cond, uncond

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]. Pixel-space models return the latents themselves."""
        if self.vae is None:
            return latents
        scale = self.vae.config.get("scaling_factor", 1.0)
        return self.vae.decode(latents / scale).sample

    # -- identity ---------------------------------------------------------------------------
    def architecture_fingerprint(self) -> str:
        """Hash of the denoiser's class, config and parameter shapes: equal for fine-tunes."""
        config = {k: v for k, v in dict(self.net.config).items() if not k.startswith("_")}
        shapes = [(n, list(p.shape)) for n, p in self.net.state_dict().items()]
        blob = json.dumps([type(self.net).__name__, config, shapes], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weights_fingerprint(self) -> str:
        """Hash of the denoiser's weights: differs between checkpoints of one architecture."""
        if "weights_fingerprint" not in self.info:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.net.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self.info["weights_fingerprint"] = digest.hexdigest()[:16]
        return self.info["weights_fingerprint"]

    def describe(self) -> dict:
        """What the store manifest and adapter config record about the base."""
        return {
            "id": self.model_id,
            "family": self.family,
            "class": type(self.net).__name__,
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "prediction_type": self.prediction_type,
            "learned_sigma": self.learned_sigma,
            "architecture_fingerprint": self.architecture_fingerprint(),
            "weights_fingerprint": self.weights_fingerprint(),
            "parameters": count_parameters(self.net),
        }


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


def _read_model_index(name: str) -> dict | None:
    path = Path(name)
    if path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else None
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(name))
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes
        raise ModelError(
            f"base model {name!r}: not a local folder, and loading it as a hub id failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give a local diffusers "
            "folder (e.g. data/base, written by `python -m stages.base`) or a hub id you can reach."
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


def load_base_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    scheduler: str = "") -> BaseModel:
    """Load a base model by local folder or hub id; ``scheduler`` optionally swaps the scheduler class."""
    if not name:
        raise ModelError("no base model given: set generate.base_model to a diffusers folder or hub id")
    path = Path(name)
    # A hub id is "org/name"; anything else that is not an existing folder is a wrong path.
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not path.is_dir() and (path.exists() or not looks_like_hub_id):
        raise ModelError(
            f"base model {name!r}: no such folder. For the embedded default run `python -m stages.base` "
            "(or `dvc repro base`) first; otherwise give a diffusers model folder or a hub id like "
            "'facebook/DiT-XL-2-256'."
        )
    index = _read_model_index(name)
    denoisers = {c: _component_class(name, index, c) for c in ("transformer", "unet")}
    family, denoiser = None, None
    pipeline_class = (index or {}).get("_class_name")
    if pipeline_class in PIPELINE_FAMILIES:
        family, denoiser = PIPELINE_FAMILIES[pipeline_class]
    else:
        denoiser = next((c for c, cls_name in denoisers.items() if cls_name in DENOISER_FAMILIES), None)
        family = DENOISER_FAMILIES[denoisers[denoiser]] if denoiser else None
    if family is None:
        found = pipeline_class or denoisers["transformer"] or denoisers["unet"]
        raise ModelError(
            f"base model {name!r}: unsupported model ({found or 'no model_index.json and no transformer/ or unet/ folder'}). "
            f"Supported families: {SUPPORTED}."
        )

    net_class = _diffusers_class(denoisers[denoiser], "denoiser", name)
    try:
        net = net_class.from_pretrained(name, subfolder=denoiser, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelError(f"base model {name!r}: cannot load its {denoiser}: {err}") from None
    sched_class_name = scheduler or _component_class(name, index, "scheduler")
    if not sched_class_name:
        raise ModelError(f"base model {name!r}: has no scheduler/ folder")
    sched_class = _diffusers_class(sched_class_name, "scheduler", name)
    scheduler_obj = sched_class.from_pretrained(name, subfolder="scheduler")
    vae = None
    vae_class_name = _component_class(name, index, "vae")
    if vae_class_name:
        vae = _diffusers_class(vae_class_name, "vae", name).from_pretrained(name, subfolder="vae",
                                                                             torch_dtype=dtype)
        vae.requires_grad_(False).eval()

    # The base is frozen and always in eval(): DiT's label embedding drops labels in train mode.
    net.requires_grad_(False).eval()
    config = net.config
    extra = {}
    agd_meta = path / "agd_base.json"
    if agd_meta.exists():
        extra = json.loads(agd_meta.read_text())
    model = BaseModel(
        net=net,
        scheduler=scheduler_obj,
        family=family,
        model_id=str(name),
        num_classes=int(config.num_embeds_ada_norm),
        latent_channels=int(config.in_channels),
        sample_size=int(config.sample_size),
        vae=vae,
        info={"meta": extra},
    )
    return model.to(device)
