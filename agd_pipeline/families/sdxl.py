"""SDXL (StableDiffusionXLPipeline): the SD UNet plus a pooled prompt embedding and size/crop ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import cfg_encode_kwargs
from .sd import StableDiffusion

if TYPE_CHECKING:
    import torch


def time_ids(side, batch: int) -> torch.Tensor:
    """Original size, crop top-left, target size: the pipeline's defaults for its native resolution."""
    import torch

    return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(batch, 6)


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    title = "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)
    # The same UNet class as SD: a bare SDXL UNet folder (no model_index.json) is told apart by its config.
    refines = "sd"

    def claims(self, config) -> bool:
        return config.get("addition_embed_type") == "text_time"

    condition_names = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")

    def condition_from_call(self, call):
        added = call.get("added_cond_kwargs") or {}
        return {"prompt_embeds": call["encoder_hidden_states"], "pooled_prompt_embeds": added["text_embeds"],
                "add_time_ids": added["time_ids"]}

    def added_conditions(self, cond):
        return {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]}

    def encode_prompt(self, pipe, base, prompts, negative):
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, negative_prompt=negative, **cfg_encode_kwargs(base))
        ids = time_ids(base.sample_size * base.vae_scale_factor, len(prompts))
        return ({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "add_time_ids": ids},
                {"prompt_embeds": negative_embeds, "pooled_prompt_embeds": negative_pooled,
                 "add_time_ids": ids})  # the same time ids in both halves, as the pipeline does

    def random_condition(self, base, batch, text_tokens=0, text_dim=0, pooled_dim=0):
        import torch

        cond = super().random_condition(base, batch, text_tokens, text_dim)
        cond["pooled_prompt_embeds"] = torch.randn(batch, pooled_dim)
        # benchmark bases are built without a VAE: SDXL's is 8 pixels per latent cell
        cond["add_time_ids"] = time_ids(float(8 * base.sample_size), batch)
        return cond
