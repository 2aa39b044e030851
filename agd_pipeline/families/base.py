"""What a base family is: the one class every family module fills in.

A family is everything that differs between DiT, SD 1.x/2.x, SDXL and SD3: how a folder is
recognised, what a condition holds, how the denoiser is called, how prompts are encoded, and where
adapters attach. :class:`agd_pipeline.models.BaseModel` is the generic object the rest of the code
talks to; it asks its family (``base.spec``) for these parts and nothing else.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from ..errors import ModelError

if TYPE_CHECKING:  # the registry is read by the configs, which must not import torch (`--help` stays instant)
    import torch
    from torch import nn

# (layer name in the denoiser, the layer: a torch Module, its input token width, its output token width)
Target = tuple[str, Any, int, int]


class Family(abc.ABC):
    """One base family. Subclasses set the attributes, implement the abstract methods and override
    what else their family needs."""

    # -- identity and detection -------------------------------------------------------------
    name: str  # recorded in store manifests and adapter configs: never rename one
    title: str  # for messages: "Stable Diffusion 1.x/2.x"
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes (model_index.json "_class_name")
    denoisers: tuple[str, ...] = ()  # denoiser classes, for folders without model_index.json
    denoiser_folder: str  # the pipeline component holding the denoiser: "transformer" or "unet"
    # A family sharing its denoiser class with another: a model detected as ``refines`` becomes this
    # family when the loaded denoiser's config passes :meth:`claims` (an SDXL UNet in an SD folder).
    refines: str | None = None

    def claims(self, config) -> bool:
        """Whether a denoiser config of the ``refines`` family is really one of this family."""
        return False

    # -- conditions ---------------------------------------------------------------------------
    conditioning: str  # "class" (a class id per sample) or "text" (prompt embeddings per sample)
    condition_names: tuple[str, ...]  # the keys of a condition dict, as predict takes them
    cond_first: bool  # CFG's batch order: [cond, uncond] (DiT) or [uncond, cond] (the SD family)

    def num_classes(self, config) -> int:
        """Classes of a class-conditional denoiser (its config), without the null class."""
        return 0

    @abc.abstractmethod
    def predict(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One call of the denoiser: timesteps batched, inputs on its device and dtype."""

    def condition_from_call(self, call: dict) -> dict:
        """The condition dict (as ``predict`` takes it) from the named arguments of a diffusers
        pipeline's call of this family's denoiser: the inverse of ``predict`` (used to put AGD
        adapters on a user's pipeline; a family without it is refused there)."""
        raise ModelError(f"AGD adapters cannot be put on a {self.title} pipeline yet (its family defines no "
                         "condition_from_call)")

    def encode_prompt(self, pipe, base, prompts: list[str], negative: str | list[str] | None) -> tuple[dict, dict]:
        """(conditions, negative conditions), one row per prompt each, for one chunk of prompts, from
        ``pipe.encode_prompt``. ``negative`` is one negative prompt for the whole chunk, one per prompt
        (a list as long as ``prompts``), or None for the pipeline's default (SDXL: zeros)."""
        raise ModelError(f"no prompt encoder for family {self.name!r}")

    # -- adapters -----------------------------------------------------------------------------
    placements: tuple[str, ...]  # where adapters may attach; the first is "auto"'s choice

    @abc.abstractmethod
    def adapter_targets(self, net: nn.Module, placement: str) -> list[Target]:
        """The layers a resolved placement wraps (without the "+output" layer)."""

    def output_layer(self, net: nn.Module) -> nn.Module | None:
        """The final token projection that "+output" placements also wrap."""
        return None

    # -- benchmarks (denoisers built from config, no pipeline folder) -------------------------
    def default_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler()

    @abc.abstractmethod
    def random_condition(self, base, batch: int, text_tokens: int = 0, text_dim: int = 0,
                         pooled_dim: int = 0) -> dict:
        """A condition of the right shapes for a step-time measurement."""

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def attention_widths(module: nn.Module) -> tuple[int, int]:
    """Input and output token widths of a diffusers attention layer."""
    return module.to_q.in_features, module.to_out[0].out_features


def cfg_encode_kwargs(base) -> dict:
    """What every pipeline's encode_prompt takes here: one image per prompt, negatives too."""
    return dict(device=base.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
