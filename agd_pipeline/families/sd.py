"""Stable Diffusion 1.x/2.x (StableDiffusionPipeline): a UNet conditioned on prompt token embeddings."""

from __future__ import annotations

from .base import Family, attention_widths, cfg_encode_kwargs


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipelines = ("StableDiffusionPipeline",)
    denoisers = ("UNet2DConditionModel",)
    denoiser_folder = "unet"

    conditioning = "text"
    condition_names = ("prompt_embeds",)
    cond_first = False  # the SD pipelines batch [uncond, cond]

    def added_conditions(self, cond: dict) -> dict | None:
        """The UNet's ``added_cond_kwargs``: none for SD 1.x/2.x."""
        return None

    def predict(self, net, x, t, cond):
        return net(x, t, encoder_hidden_states=cond["prompt_embeds"],
                   added_cond_kwargs=self.added_conditions(cond)).sample

    def condition_from_call(self, call):
        return {"prompt_embeds": call["encoder_hidden_states"]}

    def encode_prompt(self, pipe, base, prompts, negative):
        negatives = [negative] * len(prompts) if isinstance(negative, str) else negative
        embeds, negative_embeds = pipe.encode_prompt(prompts, negative_prompt=negatives, **cfg_encode_kwargs(base))
        return {"prompt_embeds": embeds}, {"prompt_embeds": negative_embeds}

    # "cross_attention" wraps the text cross-attention (attn2) of every transformer block in the
    # down, mid and up blocks, all of them; "block" wraps those blocks. "+output" also wraps the
    # UNet's final convolution (conv_out); "cross_attention+resnet+output" wraps every ResNet block
    # besides (in module order). On a convolution or ResNet block the adapter acts on each pixel's
    # features as a token.
    placements = ("cross_attention", "cross_attention+output", "cross_attention+resnet+output", "block",
                  "block+output")

    def adapter_targets(self, net, placement):
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        if placement.startswith("block"):
            return [(n, m, m.norm1.normalized_shape[0], m.norm1.normalized_shape[0])
                    for n, m in net.named_modules() if isinstance(m, BasicTransformerBlock)]
        resnets = "+resnet" in placement
        targets = []
        for n, m in net.named_modules():
            if isinstance(m, BasicTransformerBlock) and m.attn2 is not None:
                targets.append((f"{n}.attn2", m.attn2, *attention_widths(m.attn2)))
            elif resnets and isinstance(m, ResnetBlock2D):
                targets.append((n, m, m.in_channels, m.out_channels))
        return targets

    def output_layer(self, net):
        return net.conv_out

    def random_condition(self, base, batch, text_tokens=0, text_dim=0, pooled_dim=0):
        import torch

        return {"prompt_embeds": torch.randn(batch, text_tokens, text_dim)}
