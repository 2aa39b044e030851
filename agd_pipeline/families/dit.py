"""Class-conditional DiT (DiTPipeline): a class id per sample, null class = the extra last label."""

from __future__ import annotations

from .base import Family, attention_widths


class DiT(Family):
    name = "dit"
    title = "class-conditional DiT"
    pipelines = ("DiTPipeline",)
    # the hub's DiT-XL/2 checkpoints name their transformer Transformer2DModel
    denoisers = ("DiTTransformer2DModel", "Transformer2DModel")
    denoiser_folder = "transformer"

    conditioning = "class"
    condition_names = ("class_label",)
    cond_first = True  # DiTPipeline batches [cond, null]

    def num_classes(self, config) -> int:
        return int(config.get("num_embeds_ada_norm") or 0)

    def predict(self, net, x, t, cond):
        return net(x, timestep=t, class_labels=cond["class_label"]).sample

    def condition_from_call(self, call):
        return {"class_label": call["class_labels"]}

    # "attention" wraps every block's self-attention (the residual then passes DiT's frozen adaLN
    # gate, which scales it per timestep and class); "block" wraps whole blocks; "+output" also
    # wraps the final token projection, whose own adaLN modulation differs between the branches.
    placements = ("attention+output", "attention", "block", "block+output")

    def adapter_targets(self, net, placement):
        blocks = net.transformer_blocks
        dim = attention_widths(blocks[0].attn1)[0]
        if placement.startswith("attention"):
            return [(f"transformer_blocks.{i}.attn1", b.attn1, dim, dim) for i, b in enumerate(blocks)]
        return [(f"transformer_blocks.{i}", b, dim, dim) for i, b in enumerate(blocks)]

    def output_layer(self, net):
        return net.proj_out_2

    def random_condition(self, base, batch, text_tokens=0, text_dim=0, pooled_dim=0):
        import torch

        return base.class_condition(torch.randint(0, base.num_classes, (batch,)))
