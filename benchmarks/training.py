"""Benchmark: one adapter-training step on full-size architectures with random weights (forward
through the frozen base with adapters, backward, AdamW), against full-model guidance distillation
(every base parameter trainable, the peer of Meng et al.); peak memory, step time, and what fits on
a GPU.

Modes: ``agd-fp32`` / ``agd-bf16`` (the frozen base's weights in bfloat16, as ``train.dtype:
bfloat16`` loads it; the adapters and their AdamW state in fp32), each also with ``-ckpt``
(the base's blocks recomputed in backward, :func:`agd_pipeline.memory.enable_base_checkpointing`),
and ``full-fp32``. Weights, gradients and optimizer state are counted exactly from the parameters;
peak memory is measured (CUDA: the allocator's peak; CPU: the process's peak resident memory above
what it held before the model was built, reset before each mode through /proc/self/clear_refs).
A mode whose weights, gradients and Adam state alone exceed this machine's memory is not run: its
bytes come from the model built on the meta device, its activations from the same architecture's
``agd-fp32`` run, and the row says ``computed``. So are the bf16 modes on a CPU (unless asked
for): their activations are their fp32 twin's measured ones at half the bytes.

Projection to a GPU with C bytes: static = weights + gradients + optimizer state (exact); per
image = measured peak - static at batch 1, scaled by (native latent side / measured side)^2 where a
smaller latent was measured (activations grow with the number of latent pixels); 1 GiB is kept for
the CUDA context and allocator slack; largest batch = floor((C - 1 GiB - static) / per image).

Nothing here is a test: numbers depend on the machine, so they are printed and written to a file.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import statistics
import time
from pathlib import Path

import torch

from agd_pipeline.adapters import AdaptedModel
from agd_pipeline.memory import (disable_base_checkpointing, enable_base_checkpointing, largest_batch,
                                 optimizer_state_bytes, training_bytes)

from .models import ARCHITECTURES, adapter_config, build_base, random_condition

# full-fp32-ckpt: the peer with the same gradient checkpointing, so a checkpointed AGD row has a like peer
MODES = ("agd-fp32", "agd-bf16", "agd-fp32-ckpt", "agd-bf16-ckpt", "full-fp32", "full-fp32-ckpt")
# the shipped config (configs/) of each architecture whose adapters the benchmarks build
SHIPPED_CONFIGS = {"dit-xl-2-256": "dit-xl-2-256.yaml", "sd-2.1-unet": "sd-2.1.yaml", "sdxl-unet": "sdxl.yaml"}
# train keys of a config -> AdapterConfig fields
_ADAPTER_KEYS = {"adapter": "kind", "placement": "placement", "width": "width", "embed_dim": "embed_dim",
                 "fourier_frequencies": "fourier_frequencies", "condition_on": "condition_on",
                 "guidance_gate": "guidance_gate"}


def shipped_adapters(name: str) -> dict:
    """The adapter settings a shipped config trains, read from the config itself (every key it sets
    of train.adapter, placement, width, embed_dim, fourier_frequencies, condition_on, guidance_gate),
    so a benchmark times the adapters that ship, not a hand-kept copy of them."""
    import yaml

    path = Path(__file__).resolve().parent.parent / "configs" / SHIPPED_CONFIGS[name]
    train = yaml.safe_load(path.read_text())["train"]
    return {field: train[key] for key, field in _ADAPTER_KEYS.items() if train.get(key) not in (None, [], "")}


SHIPPED_ADAPTERS = {name: shipped_adapters(name) for name in SHIPPED_CONFIGS}
GPU_CAPACITIES_GB = (24, 40, 80)  # GiB, as GPUs are sold ("24 GB" cards hold 24 GiB)
GPU_RESERVE = 2 ** 30  # CUDA context and allocator slack kept out of the projection
GIB = 2 ** 30


def _rss() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes since the last reset) of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> bool:
    """Reset the peak resident memory to the current one (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Meter:
    """Peak memory above a baseline: CUDA's allocator on a GPU, resident memory on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
        else:
            gc.collect()
            self.baseline = _rss()[0]

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif not _reset_peak():
            raise RuntimeError("cannot reset the peak resident memory (/proc/self/clear_refs): CPU peaks "
                               "need Linux")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _rss()[1] - self.baseline


def machine_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def meta_bytes(name: str, mode: str) -> dict:
    """Exact parameter, gradient and optimizer bytes of a mode, from the model on the meta device."""
    base = build_base(name, device="meta")
    if mode.startswith("full"):
        base.net.requires_grad_(True)
        return training_bytes(base.net)
    if "bf16" in mode:
        base.net.to(torch.bfloat16)
    model = AdaptedModel(base, adapter_config(name, base, **SHIPPED_ADAPTERS.get(name, {})))
    counts = training_bytes(model, base.net)
    model.remove()
    return counts


def _inputs(name: str, base, batch: int, side: int, generator: torch.Generator, device) -> tuple:
    channels = base.latent_channels
    x = torch.randn(batch, channels, side, side, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    w = 1.0 + 4.0 * torch.rand(batch, generator=generator)
    target = torch.randn(batch, channels, side, side, generator=generator)
    cond = random_condition(name, base, batch)
    if "add_time_ids" in cond:  # SDXL's size conditioning: the measured resolution
        from agd_pipeline.families.sdxl import time_ids
        cond["add_time_ids"] = time_ids(float(8 * side), batch)
    return (x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()}, w.to(device),
            target.to(device))


def training_step_row(name: str, mode: str, batch: int = 1, side: int | None = None, repeats: int = 2,
                      device: str = "cpu", seed: int = 0, measure: bool = True) -> dict:
    """One mode on one architecture: build, then 1 warm-up step and ``repeats`` timed steps
    (``measure=False``: the exact byte counts only, activations filled in by :func:`project`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    device = torch.device(device)
    arch = ARCHITECTURES[name]
    native = arch.config["sample_size"]
    side = side or native
    if arch.family in ("dit", "sd3") and side != native:
        raise ValueError(f"{name}: a transformer is measured at its sample size {native} only")
    counted = meta_bytes(name, mode)
    static = counted["weight_bytes"] + counted["gradient_bytes"] + counted["optimizer_bytes"]
    row = {"architecture": name, "mode": mode, "batch": batch, "latent_side": side, "native_latent_side": native,
           "device": device.type, "threads": torch.get_num_threads(), **counted, "static_bytes": static}
    if static > 0.8 * machine_memory():
        row.update(measured=False, note="weights, gradients and Adam state exceed this machine's memory: computed")
        return row
    if not measure:
        row.update(measured=False, note="not run here (bfloat16 on a CPU without native bfloat16 units): computed")
        return row

    torch.manual_seed(seed)
    meter = Meter(device)
    base = build_base(name, device=device)
    full = mode.startswith("full")
    if "bf16" in mode:
        base.net.to(torch.bfloat16)
    if full:
        base.net.requires_grad_(True)
        model, trainable = None, list(base.net.parameters())
        if mode.endswith("-ckpt"):  # diffusers' own block checkpointing (no adapters to restore here)
            base.net.train()
            base.net.enable_gradient_checkpointing()
    else:
        model = AdaptedModel(base, adapter_config(name, base, **SHIPPED_ADAPTERS.get(name, {}))).train()
        trainable = list(model.parameters())
        if mode.endswith("-ckpt"):
            enable_base_checkpointing(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    x, t, cond, w, target = _inputs(name, base, batch, side, generator, device)
    channels = base.latent_channels

    def step() -> None:
        output = base.predict(x, t, cond) if full else model(x, t, cond, w)
        loss = (output[:, :channels].float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meter.start()
    times = []
    for i in range(1 + repeats):
        began = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - began)
    peak = meter.peak()
    row.update(measured=True, seconds_per_step=statistics.median(times), peak_bytes=peak,
               measured_optimizer_bytes=optimizer_state_bytes(optimizer),
               activation_bytes=max(0, peak - static))
    if model is not None:
        if mode.endswith("-ckpt"):
            disable_base_checkpointing(model)
        model.remove()
    return row  # the model, its gradients and optimizer state are freed with this frame


def project(rows: list[dict]) -> list[dict]:
    """Fill in the activations of computed rows (the same architecture's agd-fp32 run) and each row's
    projected per-image memory at the native resolution and largest batch per GPU size."""
    by_key = {(r["architecture"], r["mode"]): r for r in rows}
    for r in rows:
        if not r.get("measured"):
            # a bf16 mode's activations: its fp32 twin's, at half the bytes per element (computed)
            twin = (r["mode"].replace("bf16", "fp32") if "bf16" in r["mode"]
                    else "agd-fp32-ckpt" if r["mode"].endswith("-ckpt") else "agd-fp32")
            reference = by_key.get((r["architecture"], twin))
            if reference is None or not reference.get("measured"):
                continue
            half = 0.5 if "bf16" in r["mode"] else 1.0
            r["activation_bytes"] = half * reference["activation_bytes"]
            r["activation_from"] = f"{twin} (measured){' x 1/2 (bfloat16)' if half < 1 else ''}"
            r["peak_bytes"] = r["static_bytes"] + r["activation_bytes"]
            r["latent_side"] = reference["latent_side"]
            r["batch"] = reference["batch"]
        if r.get("activation_bytes", 0) < 2 ** 20:  # none, or below what resident memory resolves
            continue
        scale = (r["native_latent_side"] / r["latent_side"]) ** 2
        per_image = r["activation_bytes"] * scale / r["batch"]
        r["projected_activation_bytes_per_image"] = per_image
        r["projected_peak_bytes_batch_1"] = r["static_bytes"] + per_image
        for capacity in GPU_CAPACITIES_GB:
            r[f"largest_batch_{capacity}gb"] = largest_batch(capacity * GIB - GPU_RESERVE, r["static_bytes"],
                                                            per_image)
    return rows


def _in_subprocess(arguments: dict) -> dict:
    code = ("import json, sys; from benchmarks.training import training_step_row; "
            "print('ROW ' + json.dumps(training_step_row(**json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True)
    rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if result.returncode != 0 or not rows:
        raise RuntimeError(f"training benchmark of {arguments['name']} {arguments['mode']} failed: "
                           f"{result.stderr.strip()[-2000:]}")
    return json.loads(rows[-1])


def training_table(names, modes=MODES, sides: dict | None = None, repeats: int = 2, device: str = "cpu",
                   on_row=None, bf16_on_cpu: bool = False) -> list[dict]:
    """Every mode on every architecture. On a CPU the bf16 modes are computed unless ``bf16_on_cpu``
    (CPUs without bfloat16 units emulate it: a DiT-XL/2 step took over 5 minutes on this 2-core one)."""
    rows = []
    for name in names:
        for mode in modes:
            measure = "bf16" not in mode or device != "cpu" or bf16_on_cpu
            arguments = dict(name=name, mode=mode, side=(sides or {}).get(name), repeats=repeats, device=device,
                             measure=measure)
            # on a CPU each measured mode runs in a process of its own: memory freed by the previous
            # one stays resident in this one and would hide the next one's peak
            row = _in_subprocess(arguments) if measure and device == "cpu" else training_step_row(**arguments)
            gc.collect()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return project(rows)
