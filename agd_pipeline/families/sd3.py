"""SD3 (StableDiffusion3Pipeline): a joint-attention transformer (MMDiT) trained with flow matching."""

from __future__ import annotations

from .base import Family, attention_widths, cfg_encode_kwargs


class StableDiffusion3(Family):
    name = "sd3"
    title = "SD3"
    pipelines = ("StableDiffusion3Pipeline",)
    denoisers = ("SD3Transformer2DModel",)
    denoiser_folder = "transformer"

    conditioning = "text"
    condition_names = ("prompt_embeds", "pooled_prompt_embeds")
    cond_first = False  # the SD pipelines batch [uncond, cond]

    def predict(self, net, x, t, cond):
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                   pooled_projections=cond["pooled_prompt_embeds"]).sample

    def condition_from_call(self, call):
        return {"prompt_embeds": call["encoder_hidden_states"], "pooled_prompt_embeds": call["pooled_projections"]}

    def encode_prompt(self, pipe, base, prompts, negative):
        # A base may record the T5 sequence length it was trained with (the embedded SD3 default has
        # no T5, whose part of the prompt is then zero padding of that length); else the pipeline's 256.
        meta = (getattr(base, "info", None) or {}).get("meta") or {}
        length = {"max_sequence_length": int(meta["max_sequence_length"])} if meta.get("max_sequence_length") else {}
        # the two None: prompt_2 and prompt_3 default to the prompt
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, None, None, negative_prompt=negative, **cfg_encode_kwargs(base), **length)
        return ({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled},
                {"prompt_embeds": negative_embeds, "pooled_prompt_embeds": negative_pooled})

    # "attention" wraps every joint block's attention (its image-token output); "+output" also
    # wraps the final token projection.
    placements = ("attention", "attention+output")

    def adapter_targets(self, net, placement):
        return [(f"transformer_blocks.{i}.attn", b.attn, *attention_widths(b.attn))
                for i, b in enumerate(net.transformer_blocks)]

    def output_layer(self, net):
        return net.proj_out

    def default_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler()

    def random_condition(self, base, batch, text_tokens=0, text_dim=0, pooled_dim=0):
        import torch

        return {"prompt_embeds": torch.randn(batch, text_tokens, text_dim),
                "pooled_prompt_embeds": torch.randn(batch, pooled_dim)}
