"""Benchmarks: time one sampling step, CFG (one batched call of 2B) against AGD (one call of B),
and count adapter parameters on full-size architectures built from config (random or meta weights).

Nothing here is a test: numbers depend on the machine, so they are printed and written to a file.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from .adapters import AdaptedModel, AdapterConfig
from .models import BaseModel, count_parameters

# Full-size configs of real checkpoints, so no weights are needed (diffusers' published configs).
ARCHITECTURES = {
    "dit-xl-2-256": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                         num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
    "toy-dit-8x8": dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1),
}


def build_dit(name: str, device: str | torch.device = "cpu") -> BaseModel:
    """A DiT of a known architecture with random weights (or no storage on the meta device)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    config = ARCHITECTURES[name]
    with torch.device(device):
        net = DiTTransformer2DModel(**config)
    net.requires_grad_(False).eval()
    return BaseModel(net=net, scheduler=DDIMScheduler(), family="dit", model_id=f"config:{name}",
                     num_classes=config["num_embeds_ada_norm"], latent_channels=config["in_channels"],
                     sample_size=config["sample_size"])


def parameter_table(name: str, kinds=("offset", "cross_attention", "bottleneck"), widths=(16, 32, 64),
                    placements=("attention", "attention+output"), embed_dim: int = 64) -> list[dict]:
    """Adapter parameters and share of the base for each kind, width and placement (meta device)."""
    base = build_dit(name, device="meta")
    total = count_parameters(base.net)
    rows = []
    for placement in placements:
        for kind in kinds:
            for width in widths:
                config = AdapterConfig(kind=kind, placement=placement, width=width, embed_dim=embed_dim,
                                       num_classes=base.num_classes)
                model = AdaptedModel(base, config)
                params = count_parameters(model)
                model.remove()
                rows.append({"architecture": name, "kind": kind, "placement": placement, "width": width,
                             "embed_dim": embed_dim, "adapter_parameters": params, "base_parameters": total,
                             "share_percent": 100 * params / total})
    return rows


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.no_grad()
def step_times(name: str, batch_sizes=(1, 4), repeats: int = 3, adapter: AdapterConfig | None = None,
               seed: int = 0) -> list[dict]:
    """Median seconds of one denoiser step: CFG (cond+uncond batched) against AGD, same inputs."""
    torch.manual_seed(seed)
    base = build_dit(name)
    adapter = replace(adapter or AdapterConfig(), num_classes=base.num_classes)
    adapted = AdaptedModel(base, adapter).eval()
    share = count_parameters(adapted) / count_parameters(base.net)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, *base.latent_shape)
        t = torch.full((batch,), 500)
        labels = torch.randint(0, base.num_classes, (batch,))
        w = torch.full((batch,), 4.0)
        cfg = _time(lambda: base.cfg_predict(x, t, labels, w), repeats)
        agd = _time(lambda: adapted(x, t, labels, w), repeats)
        unguided = _time(lambda: base.predict(x, t, labels), repeats)
        rows.append({"architecture": name, "batch": batch, "cfg_seconds": cfg, "agd_seconds": agd,
                     "unguided_seconds": unguided, "speedup_agd_over_cfg": cfg / agd,
                     "adapter_overhead_percent": 100 * (agd / unguided - 1),
                     "adapter": f"{adapter.kind} r{adapter.width} at {adapter.placement}",
                     "adapter_share_percent": 100 * share, "threads": torch.get_num_threads()})
    return rows
