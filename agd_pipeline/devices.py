"""Torch devices and dtypes named in settings: parsed, checked against this machine, resolved."""

from __future__ import annotations

import os
import sys

from .errors import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N, mps"


def parse_device(device: str, key: str = "device"):
    """The torch.device a device string names (None for ``auto``), if it is one we can run on
    somewhere (cpu, cuda[:N], mps); else ConfigError naming ``key``. Whether this machine has it
    is resolve_device's question, so a params file for a GPU machine validates anywhere."""
    if device == "auto":
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key}: unknown device {device!r}; allowed: {DEVICES}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}: device type {parsed.type!r} is not supported; allowed: {DEVICES}")
    return parsed


def resolve_device(device: str, key: str = "device") -> str:
    """``auto`` -> cuda if a GPU is there, else cpu. Any other value is checked: a device string
    torch can parse, of a kind that is available here (and an index that exists); else ConfigError
    naming ``key``."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    parsed = parse_device(device, key)
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {device!r} asked for, but torch sees no CUDA GPU here; use cpu or auto")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{key}: {device!r} does not exist; this machine has {count} CUDA device(s) "
                              f"(cuda:0 .. cuda:{count - 1})")
        return device
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{key}: {device!r} asked for, but MPS is not available here; use cpu or auto")
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name or "float32"]


# ------------------------------------------------------------------------------ thread policy

THREADS_ENV = "AGD_NUM_THREADS"


def thread_count() -> int:
    """Torch's intra-op threads for a command: ``AGD_NUM_THREADS`` (a positive integer, or ``all``
    for every core this process may use), else ``OMP_NUM_THREADS`` where the user set it, else 1.

    1 is the default because it is the fastest choice on a loaded machine and costs little on a
    quiet one (the models these stages run on a CPU are small: ``python -m stages.benchmark
    threads`` measures both), and a fixed count keeps CPU results bit-for-bit reproducible
    whatever the load (a parallel reduction's order can depend on the thread count). On a GPU the
    math does not run in these threads. Raise it for large models on a quiet many-core CPU."""
    value = os.environ.get(THREADS_ENV, "").strip().lower()
    if not value:
        user = os.environ.get("OMP_NUM_THREADS", "").strip()
        return int(user) if user.isdigit() and int(user) >= 1 else 1
    if value == "all":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_ENV}={os.environ[THREADS_ENV]!r}: expected a positive integer or 'all'")
    return int(value)


def apply_thread_policy() -> int:
    """Apply :func:`thread_count` to torch: through OMP_NUM_THREADS before torch is imported (torch
    reads it once, at import), or directly once it is. Returns the count."""
    count = thread_count()
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
    else:
        os.environ["OMP_NUM_THREADS"] = str(count)
    return count
