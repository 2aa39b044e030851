"""Torch devices and dtypes named in settings: parsed, checked against this machine, resolved."""

from __future__ import annotations

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
