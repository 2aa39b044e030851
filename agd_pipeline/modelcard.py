"""The adapter folder's model card (README.md), written with ``huggingface_hub.ModelCard``.

The card is what the Hub shows and indexes, so its metadata must be true: ``library_name`` is ours
(``agd-pipeline``: diffusers alone cannot load the adapters), ``base_model`` is the base's hub id
(with ``base_model_relation: adapter``) or absent when stage one recorded a local folder (a path on
the training machine means nothing elsewhere, and the Hub would reject or mislink it). The body says
what the adapters were trained on (the range of w, the steps and the sampler of the distilled
trajectories), gives a usage snippet that runs, and, once ``stages.report --model-card`` adds them,
the evaluation numbers with their 95 % intervals.

The snippet names the adapters by :data:`REPO_PLACEHOLDER` until the folder is pushed:
:func:`agd_pipeline.hub.push_adapters` puts the repository id there in the card it uploads.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

LIBRARY_NAME = "agd-pipeline"
MODEL_CARD = "README.md"
# the adapters' name in the snippet until push_adapters writes the repository id there
REPO_PLACEHOLDER = "your-name/agd-adapters"
PLACEHOLDER_COMMENT = "  # the repository id once pushed (push_to_hub), or this adapter folder's path"
# the base's name in the snippet when stage one recorded a local folder (never published)
LOCAL_BASE_PLACEHOLDER = "path/to/the/local/base"
DEFAULT_LICENSE = "other"  # the adapters derive from the base: its license terms apply
TAGS = ["diffusers", "guidance-distillation", "adapter", "agd", "classifier-free-guidance"]
# diffusers pipeline class per family (the adapters apply to these, agd_pipeline.pipelines)
_PIPELINE_TAGS = {"text": "text-to-image"}
_PROMPT = "a photograph of a red bicycle by a canal"


def is_hub_id(model_id: str) -> bool:
    """Whether a recorded base id names a hub repository rather than a local folder: a folder that
    exists here, or a name a hub id cannot be (absolute, ``./``, ``~``, more than one ``/``), is local."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not model_id or os.path.exists(os.path.expanduser(model_id)):
        return False
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1:
        return False
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def card_data(config: dict, license: str = DEFAULT_LICENSE) -> ModelCardData:
    """The card's YAML metadata: ours as library, the base's hub id (never a local path), the tags,
    and what the adapters were trained for under ``agd``."""
    base = config["base_model"]
    guidance, sampler = config.get("guidance") or {}, config.get("sampler") or {}
    hub_base = base["id"] if is_hub_id(str(base.get("id", ""))) else None
    family = base.get("family")
    trained = {key: value for key, value in {
        "family": family,
        "base_model_revision": base.get("revision") if hub_base else None,
        "base_model_local": None if hub_base else True,
        "guidance_range": [guidance["min"], guidance["max"]] if "min" in guidance and "max" in guidance else None,
        "num_steps": sampler.get("num_steps"),
        "scheduler": sampler.get("scheduler"),
        "format_version": config.get("format_version"),
    }.items() if value is not None}
    return ModelCardData(
        library_name=LIBRARY_NAME, license=license, base_model=hub_base,
        tags=[*TAGS, *([family] if family else [])],
        pipeline_tag=_PIPELINE_TAGS.get(base.get("conditioning", "")),
        **({"base_model_relation": "adapter"} if hub_base else {}),
        agd=trained,
    )


def usage_snippet(config: dict, repo_id: str = REPO_PLACEHOLDER, subfolder: str | None = None) -> str:
    """Python that loads the base pipeline, the adapters from ``repo_id`` and samples one image at one
    evaluation per step, with the recorded scheduler, steps and a w inside the training range."""
    base = config["base_model"]
    sampler, guidance = config.get("sampler") or {}, config.get("guidance") or {}
    hub = is_hub_id(str(base.get("id", "")))
    options = "".join(f", {key}={base[key]!r}" for key in ("revision", "variant") if hub and base.get(key))
    base_name = base["id"] if hub else LOCAL_BASE_PLACEHOLDER
    where = ("the base the adapters were distilled on" if hub
             else "a copy of the local base the adapters were trained on")
    scheduler = sampler.get("scheduler")
    try:
        import diffusers

        scheduler = scheduler if scheduler and hasattr(diffusers, scheduler) else None
    except ImportError:  # pragma: no cover - diffusers is a dependency
        scheduler = None
    low, high = guidance.get("min", 1.0), guidance.get("max", 7.5)
    w = round((low + high) / 2, 2) if high > 1 else 1.0
    steps = sampler.get("num_steps") or 30
    imports = ", ".join(["DiffusionPipeline", *([scheduler] if scheduler else [])])
    lines = ["import torch", f"from diffusers import {imports}", "from agd_pipeline.pipelines import AGDAdapters", "",
             f"pipe = DiffusionPipeline.from_pretrained({base_name!r}{options})  # {where}"]
    if scheduler:
        lines.append(f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config)  # the distilled sampler")
    lines.append(f"adapters = AGDAdapters.from_pretrained({repo_id!r}"
                 + (f", subfolder={subfolder!r}" if subfolder else "") + ")"
                 + (PLACEHOLDER_COMMENT if repo_id == REPO_PLACEHOLDER else ""))
    generator = "generator=torch.Generator().manual_seed(0)"
    lines.append("with adapters.applied(pipe):  # one denoiser evaluation per step instead of CFG's two")
    if base.get("conditioning") == "text":
        lines.append(f"    image = pipe({_PROMPT!r}, negative_prompt=adapters.negative_prompt, guidance_scale={w:g}, "
                     f"num_inference_steps={steps}, {generator}).images[0]")
    else:
        lines.append(f"    image = pipe(class_labels=[0], guidance_scale={w:g}, num_inference_steps={steps}, "
                     f"{generator}).images[0]")
    lines += ['image.save("agd.png")', "# outside the block the pipeline is itself again: its own CFG"]
    return "\n".join(lines)


def render_model_card(config: dict, metrics: dict | None = None, repo_id: str = REPO_PLACEHOLDER,
                      subfolder: str | None = None, license: str = DEFAULT_LICENSE) -> ModelCard:
    """The model card of an adapter folder's ``adapter_config.json`` (and of ``metrics.json`` of
    ``stages.evaluate`` when given): metadata, description, usage and evaluation."""
    base, adapter, parameters = config["base_model"], config["adapter"], config.get("parameters") or {}
    guidance, sampler = config.get("guidance") or {}, config.get("sampler") or {}
    hub = is_hub_id(str(base.get("id", "")))
    title = f"`{base['id']}`" if hub else f"a local {base.get('class', 'diffusers')} base"
    if hub:
        pinned = "".join(f", {k} `{base[k]}`" for k in ("revision", "variant") if base.get(k))
        source = f"`{base['id']}` from the Hugging Face Hub{pinned}"
    else:
        source = ("a local model folder (not published; its path is not recorded here): load a copy of the same "
                  "weights, which the weights fingerprint identifies")
    lines = [
        f"# AGD adapters for {title}", "",
        "Adapter guidance distillation (Jensen & Sadat, arXiv 2503.07274): small adapters on the frozen base,",
        "conditioned on the guidance scale w, so that one network evaluation per sampling step reproduces",
        "classifier-free guidance (CFG, two evaluations per step). Off, they give back the base exactly.",
        f"Trained with `{LIBRARY_NAME}`, which loads them onto a diffusers pipeline (diffusers alone does not).",
        "", "## Training", "",
        f"- base: {source}; {base.get('class')}, family `{base.get('family')}`, {base.get('dtype')}; weights "
        f"fingerprint `{base.get('weights_fingerprint')}`",
        f"- adapters: {adapter['kind']}, width {adapter['width']}, at `{adapter['placement']}` "
        f"({len(config.get('placements', []))} layers), conditioned on {', '.join(adapter['condition_on'])}",
    ]
    if parameters:
        lines.append(f"- parameters: {parameters['adapter']:,} ({100 * parameters['share']:.2f} % of the base's "
                     f"{parameters['base']:,})")
    if "min" in guidance and "max" in guidance:
        lines.append(f"- trained for w in [{guidance['min']:g}, {guidance['max']:g}]; outside that range they follow "
                     "CFG less closely")
    if sampler.get("scheduler"):
        lines.append(f"- distilled from {sampler['scheduler']} trajectories of {sampler.get('num_steps')} steps: "
                     "sample with that scheduler (the snippet below sets it)")
    elif sampler.get("num_steps"):
        lines.append(f"- distilled from trajectories of {sampler['num_steps']} steps")
    if guidance.get("negative_prompts"):
        lines.append(f"- distilled with {len(guidance['negative_prompts'])} negative prompts (and the empty one "
                     f"with probability {guidance.get('empty_negative_probability', 0):g}): pass yours as "
                     "`negative_prompt`" + (" (the adapters see it)" if "negative_text" in adapter["condition_on"]
                                           else ""))
    elif config.get("negative_prompt"):
        lines.append(f"- negative prompt of the recorded CFG: `{config['negative_prompt']}`")
    lines += ["", "## Usage", "", f"With `{LIBRARY_NAME}` installed:", "", "```python",
              usage_snippet(config, repo_id, subfolder), "```", "",
              "`adapters.apply(pipe)` / `adapters.remove()` do the same without a block; `AGDAdapters.from_pretrained` "
              "also takes `revision=`, `subfolder=`, `token=`, `cache_dir=` and `local_files_only=`.", "",
              "Files: `adapters.safetensors` (adapter weights only), `adapter_config.json` (everything above, the "
              "training settings and sha256 digests checked on every load), and `validation/` (a CFG | AGD grid "
              "at fixed seeds) where published.", "",
              "License: the adapters are trained on the base model's outputs; the base's license terms apply to "
              "them as well.", ""]
    if metrics:
        lines += evaluation_section(metrics)
    content = f"---\n{card_data(config, license).to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def _cell(row: dict, intervals: dict, key: str, digits: int = 2) -> str:
    """A number with its 95 % interval in brackets where the evaluation computed one."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    interval = intervals.get(key) or {}
    if isinstance(interval, dict) and "low" in interval and "high" in interval:
        return f"{value:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"
    return f"{value:.{digits}f}"


def evaluation_section(metrics: dict) -> list[str]:
    """The card's evaluation table (``metrics.json`` of ``stages.evaluate``): per w the FIDs and, where
    measured, the accuracies, each with its 95 % interval when the run kept per-sample outcomes."""
    rows = list(metrics["per_w"].values())
    evidence = (metrics.get("evidence") or {}).get("per_w") or {}
    accuracy = any(row.get("accuracy_cfg") is not None for row in rows)
    split = metrics.get("split", "validation")
    lines = ["## Evaluation", "",
             f"From `stages.evaluate` ({split} split, {metrics['samples_per_w']} samples per w, "
             f"{metrics['num_steps']} steps); FIDs in the evaluation classifier's feature space, AGD-CFG is the FID "
             "of AGD's samples to CFG's on the same seeds."]
    boot = (metrics.get("evidence") or {}).get("bootstrap")
    if boot:
        drawn = "prompts" if boot.get("clusters") == "prompt" else "samples"
        lines[-1] += (f" Brackets hold 95 % intervals (paired bootstrap over {drawn}, {boot.get('replicates')} "
                      "replicates).")
    header = ["w", "FID CFG", "FID AGD", "FID AGD-CFG", *(["accuracy CFG", "accuracy AGD"] if accuracy else []),
              "speed AGD/CFG"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in metrics["per_w"].items():
        intervals = evidence.get(key) or {}
        outside = "*" if row.get("in_training_range") is False else ""
        cells = [f"{row['w']:g}{outside}",
                 *(_cell(row, intervals, k) for k in ("fid_cfg", "fid_agd", "fid_to_cfg_agd"))]
        if accuracy:
            cells += [_cell(row, intervals, k, 3) for k in ("accuracy_cfg", "accuracy_agd")]
        cells.append(f"{row['speed_ratio_agd_over_cfg']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    if any(row.get("in_training_range") is False for row in rows):
        lines += ["", "`*`: a w outside the training range."]
    speed = metrics.get("speed") or {}
    batch = (speed.get("per_batch") or {}).get(str(speed.get("evaluation_batch")), {})
    ratio = batch.get("speed_ratio_agd_over_cfg")
    if isinstance(ratio, dict) and {"median", "min", "max"} <= set(ratio):
        lines += ["", f"Speed AGD/CFG at batch {speed['evaluation_batch']}: median {ratio['median']:.2f}x (min "
                  f"{ratio['min']:.2f}x, max {ratio['max']:.2f}x over {batch.get('repeats')} interleaved repeats; "
                  f"the evaluations per step allow {speed.get('ceiling_agd_over_cfg', 2.0):g}x"
                  + (f", CFG's measured time over the unguided model's {measured:.2f}x"
                     if (measured := speed.get("measured_ceiling_agd_over_cfg")) is not None else "") + ")."]
    return [*lines, ""]


def write_model_card(folder: str | Path, config: dict, metrics: dict | None = None) -> Path:
    """Write the adapter folder's README.md (see :func:`render_model_card`); a failed write never
    leaves half a card."""
    path = Path(folder) / MODEL_CARD
    text = str(render_model_card(config, metrics))
    tmp = path.with_name(MODEL_CARD + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def card_for_repository(text: str, repo_id: str, subfolder: str | None = None) -> str:
    """A card of :func:`render_model_card` with the snippet naming ``repo_id`` (and ``subfolder``)
    instead of :data:`REPO_PLACEHOLDER`."""
    call = f"AGDAdapters.from_pretrained({repo_id!r}" + (f", subfolder={subfolder!r}" if subfolder else "") + ")"
    return re.sub(r"AGDAdapters\.from_pretrained\(" + re.escape(repr(REPO_PLACEHOLDER)) + r"\)"
                  + f"(?:{re.escape(PLACEHOLDER_COMMENT)})?", lambda _: call, text)
