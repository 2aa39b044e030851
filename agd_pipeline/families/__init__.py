"""Base families: one module each, behind :class:`Family`, and the one registry below.

Adding a family is a new module here (a :class:`Family` subclass: see ``sd3.py`` for a whole one)
and one entry in ``FAMILIES``. Everything else (detection, error messages, adapter placements,
benchmarks) asks the registry.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ModelError
from .base import Family, Target, attention_widths
from .dit import DiT
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

# The registry. Its order is the order of the supported list in messages.
FAMILIES: tuple[Family, ...] = (DiT(), StableDiffusion(), StableDiffusionXL(), StableDiffusion3())

BY_NAME = {family.name: family for family in FAMILIES}
# Where adapters may attach, per family; the first is "auto"'s (train.placement's choices come from here).
PLACEMENTS = {family.name: family.placements for family in FAMILIES}
ALL_PLACEMENTS = ("auto", *sorted({p for allowed in PLACEMENTS.values() for p in allowed}))
# The pipeline components a denoiser may live in, in the order they are looked for.
DENOISER_FOLDERS = tuple(dict.fromkeys(family.denoiser_folder for family in FAMILIES))

__all__ = ["FAMILIES", "BY_NAME", "DENOISER_FOLDERS", "PLACEMENTS", "ALL_PLACEMENTS", "Family", "Target",
           "attention_widths", "get", "from_pipeline", "from_denoiser", "detect", "refine", "supported",
           "placement_help"]


def placement_help() -> str:
    """Each family's placements for ``train.placement``'s help: its default first."""
    return "; ".join(f"{family.name}: {', '.join(family.placements)}" for family in FAMILIES)


def get(name: str) -> Family:
    """The family of a recorded name ("dit", "sd", "sdxl", "sd3")."""
    if name not in BY_NAME:
        raise ModelError(f"unknown model family {name!r} (known: {', '.join(BY_NAME)})")
    return BY_NAME[name]


def supported() -> str:
    """The supported families, for error messages."""
    return ", ".join(f"{family.title} ({family.pipelines[0]})" for family in FAMILIES)


def from_pipeline(class_name: str | None) -> Family | None:
    return next((family for family in FAMILIES if class_name in family.pipelines), None)


def from_denoiser(class_name: str | None, config=None) -> Family | None:
    """The family of a denoiser class; with the denoiser's config, families that share a class
    (SD and SDXL UNets) are told apart, without it the one the others refine is meant."""
    family = next((f for f in FAMILIES if f.refines is None and class_name in f.denoisers), None)
    return family if family is None or config is None else refine(family, config)


def detect(pipeline_class: str | None, denoiser_classes: Iterable[str | None]) -> Family | None:
    """The family of a folder, before its denoiser is loaded: its pipeline class, else the first
    denoiser class a family knows. Call :func:`refine` once the denoiser's config is known."""
    family = from_pipeline(pipeline_class)
    if family is None:
        family = next((f for f in map(from_denoiser, denoiser_classes) if f is not None), None)
    return family


def refine(family: Family, config) -> Family:
    """A more specific family sharing this one's denoiser, if the denoiser's config says so
    (an SDXL UNet in a bare unet folder, or in a folder calling itself StableDiffusionPipeline)."""
    return next((f for f in FAMILIES if f.refines == family.name and f.claims(config)), family)
