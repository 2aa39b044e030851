"""Benchmarks: time one sampling step, CFG (one batched call of 2B) against AGD (one call of B),
and count adapter parameters on full-size architectures built from config (random or meta weights).

Nothing here is a test: numbers depend on the machine, so they are printed and written to a file.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch

from agd_pipeline import families
from agd_pipeline.adapters import AdaptedModel, AdapterConfig, default_condition_on
from agd_pipeline.models import BaseModel, count_parameters


@dataclass(frozen=True)
class Architecture:
    """A published denoiser config (diffusers' config.json of the checkpoint), so no weights are needed."""

    family: str  # a name in the families registry
    denoiser: str  # diffusers class
    config: dict
    text_tokens: int = 0  # prompt tokens the text encoders produce
    text_dim: int = 0
    pooled_dim: int = 0


ARCHITECTURES = {
    "dit-xl-2-256": Architecture("dit", "DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
    "dit-s-2-256": Architecture("dit", "DiTTransformer2DModel", dict(
        num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
    "sd-2.1-unet": Architecture("sd", "UNet2DConditionModel", dict(
        attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], in_channels=4, out_channels=4,
        layers_per_block=2, sample_size=96, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        upcast_attention=True, use_linear_projection=True), text_tokens=77, text_dim=1024),
    "sdxl-unet": Architecture("sdxl", "UNet2DConditionModel", dict(
        addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
        out_channels=4, layers_per_block=2, projection_class_embeddings_input_dim=2816, sample_size=128,
        transformer_layers_per_block=[1, 2, 10],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True),
        text_tokens=77, text_dim=2048, pooled_dim=1280),
    "sd3-medium": Architecture("sd3", "SD3Transformer2DModel", dict(
        attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
        num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
        pos_embed_max_size=192, sample_size=128), text_tokens=333, text_dim=4096, pooled_dim=2048),
    "toy-dit-8x8": Architecture("dit", "DiTTransformer2DModel", dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=4,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)),
}


def build_base(name: str, device: str | torch.device = "cpu") -> BaseModel:
    """A denoiser of a known architecture with random weights (or no storage on the meta device)."""
    import diffusers

    arch = ARCHITECTURES[name]
    family = families.get(arch.family)
    with torch.device(device):
        net = getattr(diffusers, arch.denoiser)(**arch.config)
    net.requires_grad_(False).eval()
    return BaseModel(net=net, scheduler=family.default_scheduler(), family=family.name, model_id=f"config:{name}",
                     num_classes=family.num_classes(arch.config),
                     latent_channels=arch.config["in_channels"], sample_size=arch.config["sample_size"])


def adapter_config(name: str, base: BaseModel, **settings) -> AdapterConfig:
    """An adapter config for this architecture: its classes or text widths, its family's defaults."""
    arch = ARCHITECTURES[name]
    settings.setdefault("placement", families.get(arch.family).placements[0])
    settings.setdefault("condition_on", default_condition_on(base.conditioning))
    return AdapterConfig(num_classes=base.num_classes, text_dim=arch.text_dim, pooled_dim=arch.pooled_dim,
                         **settings)


def parameter_table(name: str, kinds=("offset", "cross_attention", "bottleneck"), widths=(16, 32, 64),
                    placements=None, embed_dim: int = 64, target_percent: float = 2.0) -> list[dict]:
    """Adapter parameters and share of the base for each kind, width and placement (meta device),
    and the width at which each kind reaches ``target_percent`` of the base (parameters grow
    linearly with the width: solved from two widths, then checked by building it)."""
    base = build_base(name, device="meta")
    total = count_parameters(base.net)

    def count(kind, placement, width):
        model = AdaptedModel(base, adapter_config(name, base, kind=kind, placement=placement, width=width,
                                                  embed_dim=embed_dim))
        params = count_parameters(model)
        model.remove()
        return params

    rows = []
    for placement in placements or families.get(ARCHITECTURES[name].family).placements:
        for kind in kinds:
            for width in widths:
                params = count(kind, placement, width)
                rows.append({"architecture": name, "kind": kind, "placement": placement, "width": width,
                             "embed_dim": embed_dim, "adapter_parameters": params, "base_parameters": total,
                             "share_percent": 100 * params / total})
            low, high = count(kind, placement, 1), count(kind, placement, 2)
            width = max(1, round((target_percent / 100 * total - low) / (high - low)) + 1)
            params = count(kind, placement, width)
            rows.append({"architecture": name, "kind": kind, "placement": placement, "width": width,
                         "embed_dim": embed_dim, "adapter_parameters": params, "base_parameters": total,
                         "share_percent": 100 * params / total, "reaches_target_percent": target_percent})
    return rows


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def random_condition(name: str, base: BaseModel, batch: int) -> dict:
    """A condition of the right shapes: class ids, or random prompt embeddings."""
    arch = ARCHITECTURES[name]
    return base.spec.random_condition(base, batch, arch.text_tokens, arch.text_dim, arch.pooled_dim)


@torch.no_grad()
def _step_inputs(name: str, base: BaseModel, batch: int) -> tuple:
    """One sampling step's inputs for the timing benchmarks: latents, t = 500, a condition, the
    unconditional one (text models; None for class models, whose null class CFG supplies) and w = 4."""
    x = torch.randn(batch, *base.latent_shape)
    t = torch.full((batch,), 500)
    cond = random_condition(name, base, batch)
    uncond = None if base.conditioning == "class" else random_condition(name, base, 1)
    return x, t, cond, uncond, torch.full((batch,), 4.0)


def step_times(name: str, batch_sizes=(1, 4), repeats: int = 3, adapter: AdapterConfig | None = None,
               seed: int = 0, adapter_settings: dict | None = None) -> list[dict]:
    """Median seconds of one denoiser step: CFG (cond+uncond batched) against AGD, same inputs.
    The adapters: ``adapter``'s kind, placement and widths, else ``adapter_settings`` (e.g. a
    shipped config's), else the family's defaults."""
    torch.manual_seed(seed)
    base = build_base(name)
    settings = dict(adapter_settings or {}) if adapter is None else {
        k: getattr(adapter, k) for k in ("kind", "placement", "width", "embed_dim")}
    adapter = adapter_config(name, base, **settings)
    adapted = AdaptedModel(base, adapter).eval()
    share = count_parameters(adapted) / count_parameters(base.net)
    rows = []
    for batch in batch_sizes:
        x, t, cond, uncond, w = _step_inputs(name, base, batch)
        cfg = _time(functools.partial(base.cfg_predict, x, t, cond, w, uncond), repeats)
        agd = _time(functools.partial(adapted, x, t, cond, w), repeats)
        unguided = _time(functools.partial(base.predict, x, t, cond), repeats)
        rows.append({"architecture": name, "batch": batch, "cfg_seconds": cfg, "agd_seconds": agd,
                     "unguided_seconds": unguided, "speedup_agd_over_cfg": cfg / agd,
                     "adapter_overhead_percent": 100 * (agd / unguided - 1),
                     "adapter": f"{adapter.kind} r{adapter.width} at {adapter.placement}",
                     "adapter_share_percent": 100 * share, "threads": torch.get_num_threads()})
    return rows


def adapter_costs(name: str, widths, kind: str, placement: str, batch_sizes=(1, 4), repeats: int = 3,
                  seed: int = 0, embed_dim: int | None = None) -> list[dict]:
    """What adapters of each width cost one denoiser step: the unguided call, CFG (one batched call
    on 2B) and AGD at every width, timed in turn within each repeat (the order reversed every
    other repeat, one warm-up each), so every ratio is paired. Median seconds of ``repeats``.
    ``cfg_over_unguided`` is the ceiling of AGD/CFG that adapters of no cost would reach. Every
    width's adapters stay hooked on the one base during all calls (an idle hook returns at once),
    so the unguided call and each AGD call pay the same few microseconds of idle hooks."""
    torch.manual_seed(seed)
    base = build_base(name)
    extra = {} if embed_dim is None else {"embed_dim": embed_dim}
    models = {width: AdaptedModel(base, adapter_config(name, base, kind=kind, placement=placement, width=width,
                                                       **extra)).eval() for width in widths}
    rows = []
    for batch in batch_sizes:
        x, t, cond, uncond, w = _step_inputs(name, base, batch)
        calls = {"unguided": functools.partial(base.predict, x, t, cond),
                 "cfg": functools.partial(base.cfg_predict, x, t, cond, w, uncond),
                 **{width: functools.partial(model, x, t, cond, w) for width, model in models.items()}}
        times = {key: [] for key in calls}
        with torch.no_grad():
            for call in calls.values():
                call()  # warm-up
            for repeat in range(repeats):
                for key in (list(calls) if repeat % 2 == 0 else list(calls)[::-1]):
                    began = time.perf_counter()
                    calls[key]()
                    times[key].append(time.perf_counter() - began)
        unguided, cfg = statistics.median(times["unguided"]), statistics.median(times["cfg"])
        for width, model in models.items():
            agd = statistics.median(times[width])
            rows.append({"architecture": name, "batch": batch, "kind": kind, "placement": placement, "width": width,
                         "adapter_share_percent": 100 * model.parameter_report()["share"],
                         "unguided_seconds": unguided, "cfg_seconds": cfg, "agd_seconds": agd,
                         "adapter_overhead_percent": 100 * (agd / unguided - 1), "speedup_agd_over_cfg": cfg / agd,
                         "cfg_over_unguided": cfg / unguided, "repeats": repeats, "threads": torch.get_num_threads()})
    for model in models.values():
        model.remove()
    return rows


def thread_table(name: str = "toy-dit-8x8", train_batch: int = 256, sample_batch: int = 200, repeats: int = 7,
                 threads=(1, 2)) -> list[dict]:
    """The thread policy's evidence: one adapter-training step and one CFG sampling step of an
    architecture (default: the embedded default's size) at each torch thread count, on the machine
    as it is and with one extra busy process (a pure-Python loop, as another job would be), the
    thread counts alternating within one run. Median seconds of ``repeats``."""
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    base = build_base(name)
    model = AdaptedModel(base, adapter_config(name, base))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(train_batch, *base.latent_shape)
    t = torch.randint(0, 1000, (train_batch,))
    cond = random_condition(name, base, train_batch)
    w = torch.rand(train_batch) * 5 + 1
    target = torch.randn(train_batch, base.net.config.out_channels, *base.latent_shape[1:])
    xs, ts, cs, ws = x[:sample_batch], t[:sample_batch], random_condition(name, base, sample_batch), w[:sample_batch]

    def train_step():
        loss = (model(x, t, cond, w) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def cfg_step():
        base.cfg_predict(xs, ts, cs, ws, None)

    before = torch.get_num_threads()
    rows = []
    for load in ("as is", "one busy process"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "as is" else None
        try:
            times = {(what, n): [] for what in ("train", "cfg") for n in threads}
            for repeat in range(repeats):
                for n in (threads if repeat % 2 == 0 else threads[::-1]):
                    torch.set_num_threads(n)
                    for what, fn in (("train", train_step), ("cfg", cfg_step)):
                        if repeat == 0:
                            fn()  # warm-up at this thread count
                        began = time.perf_counter()
                        fn()
                        times[(what, n)].append(time.perf_counter() - began)
            load_average = os.getloadavg()[0]
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        for (what, n), values in times.items():
            rows.append({"architecture": name, "load": load, "load_average": load_average, "step": what,
                         "batch": train_batch if what == "train" else sample_batch, "threads": n,
                         "median_seconds": statistics.median(values), "min_seconds": min(values),
                         "max_seconds": max(values)})
    torch.set_num_threads(before)
    for row in rows:
        one = next(r for r in rows if r["load"] == row["load"] and r["step"] == row["step"] and r["threads"] == 1)
        row["over_1_thread"] = row["median_seconds"] / one["median_seconds"]
    return rows
