"""No silent settings: where each value of a stage's config comes from, the one block a stage prints
about it, and the guard against a base of another family writing into the params file's outputs.

A value comes from one of three places: the config dataclass (``built-in``), the params file's
section (``params.yaml [generate]``) or the command line (``--base-model``). Stages print, once and
before any work, the values a user may not expect (:func:`settings_block`), and ``--help`` shows the
value that will apply (:func:`applies`). Nothing here changes a value or writes a file: it reads,
prints and refuses, so it has no effect on any stage's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from .config import CONFIG_CLASSES
from .errors import ConfigError

BUILT_IN = "built-in"
VALUE_WIDTH = 80  # characters of a value in the settings block and --help (long prompt lists shortened)


def option_name(field: str) -> str:
    """The command-line option of a config field: ``base_model`` -> ``--base-model``."""
    return "--" + field.replace("_", "-")


def section_label(params: str | os.PathLike, section: str) -> str:
    """How a params file's section is named in messages: ``params.yaml [generate]``."""
    return f"{params} [{section}]"


def value_sources(cls: type, section: dict, overrides: dict, params_label: str | None) -> dict[str, str]:
    """Field name -> where its value comes from: the option (a command-line value wins), the params
    file's section (``params_label``), else the built-in default."""
    sources = {}
    for field in dataclasses.fields(cls):
        if overrides.get(field.name) is not None:
            sources[field.name] = option_name(field.name)
        elif params_label is not None and field.name in section:
            sources[field.name] = params_label
        else:
            sources[field.name] = BUILT_IN
    return sources


def show(value: Any) -> str:
    """A value as params.yaml would spell it, shortened to one readable line."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    elif value == "":
        text = "''"
    else:
        text = str(value)
    return textwrap.shorten(" ".join(text.split()), VALUE_WIDTH, placeholder=" ...") or "''"


def built_in_values(cls: type) -> dict[str, Any]:
    defaults = cls()
    return {field.name: getattr(defaults, field.name) for field in dataclasses.fields(cls)}


def settings_block(config, sources: dict[str, str], params_note: str) -> str:
    """The lines a stage prints before it starts: a header naming the params file (or saying there
    is none), then one line per value that is not the built-in one, or was given on the command line,
    and always what the stage reads and writes (its inputs and out_dir), each with where it comes from."""
    built_in = built_in_values(type(config))
    always = {"out_dir", *type(config).inputs}
    lines = [f"{config.section} settings ({params_note}; other values are the built-in ones, see --help):"]
    for name, source in sources.items():
        value = getattr(config, name)
        if value != built_in[name] or source.startswith("--") or (name in always and value):
            lines.append(f"  {name} = {show(value)}  ({source})")
    return "\n".join(lines)


def main_process() -> bool:
    """Whether this is the one process of a run that speaks (rank 0 under torchrun or accelerate;
    the only process otherwise): a multi-process run prints its settings once."""
    return os.environ.get("RANK", "0") in ("", "0")


def announce(config, sources: dict[str, str], params_note: str) -> None:
    """Print the settings block to the stage's log (stdout), once: only in the main process."""
    if main_process():
        print(settings_block(config, sources, params_note), flush=True)


# ------------------------------------------------------------------------------ family guard

# A stage's inputs (the fields that name what it reads, and how each one's family is read: a base
# model folder (model_index.json), a trajectory store (manifest.json) or an adapter folder) and the
# kind of input its out_dir writes are its config's ``inputs`` and ``writes``
# (:class:`agd_pipeline.config.StageConfig`).


def _inputs(section: str) -> dict[str, str]:
    cls = CONFIG_CLASSES.get(section)
    return cls.inputs if cls is not None else {}


def _producers(kind: str) -> list[str]:
    """The sections whose out_dir writes inputs of ``kind``, in the params file's own pipeline."""
    return [section for section, cls in CONFIG_CLASSES.items() if cls.writes == kind]


# How a message says what an input of each kind is: "--store s holds trajectories of the SDXL family".
WHAT = {"base": "is of", "store": "holds trajectories of", "adapters": "holds adapters of"}


def _family_name(name: str | None) -> str | None:
    from . import families

    return name if name in families.BY_NAME else None


def base_family(name: str, revision: str = "") -> str | None:
    """The family of a base model, read from its model_index.json (or its denoiser's config) without
    loading weights; a hub id only from the local Hugging Face cache, never over the network. None
    when it cannot be told here (not a folder, not cached, not a known family)."""
    from . import families

    path = Path(name)
    if path.is_dir():
        index_file = path / "model_index.json"
        read = lambda component: _read_json(path / component / "config.json")  # noqa: E731
    else:
        index_file = _cached_hub_file(name, "model_index.json", revision)
        read = lambda component: _read_json(_cached_hub_file(name, f"{component}/config.json", revision))  # noqa: E731
    index = _read_json(index_file) or {}
    family = families.from_pipeline(index.get("_class_name"))
    if family is not None and family.refines is None and not any(f.refines == family.name for f in families.FAMILIES):
        return family.name
    for folder in families.DENOISER_FOLDERS:  # no index, or a class other families refine (SD vs SDXL UNets)
        config = read(folder)
        found = families.from_denoiser((config or {}).get("_class_name"), config) if config else None
        if found is not None and (family is None or found.name == family.name or found.refines == family.name):
            return found.name
    return family.name if family is not None else None


def _cached_hub_file(repo_id: str, filename: str, revision: str) -> Path | None:
    """A hub repository's file if the local cache holds it (no network), else None."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    except Exception:  # noqa: BLE001 - a malformed id is simply not in the cache
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path | None) -> dict | None:
    try:
        data = json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_family(folder: str, marker: str) -> str | None:
    """The base family a store (manifest.json) or adapter folder (adapter_config.json) records."""
    data = _read_json(Path(folder) / marker) or {}
    base = data.get("base_model")
    return _family_name(base.get("family")) if isinstance(base, dict) else None


def input_family(kind: str, value: str, revision: str = "") -> str | None:
    """The family of a stage input of ``kind`` (base, store, adapters), or None when unknown."""
    if not value:
        return None
    if kind == "store":
        return recorded_family(value, "manifest.json")
    if kind == "adapters":
        return recorded_family(value, "adapter_config.json")
    return base_family(value, revision)


def _same_folder(a: str, b: str) -> bool:
    return bool(a) and bool(b) and os.path.normpath(a) == os.path.normpath(b)


def _section(params: dict, name: str) -> dict:
    section = params.get(name)
    return section if isinstance(section, dict) else {}


def params_family(params: dict, section: str, depth: int = 0) -> tuple[str, str] | None:
    """The family of the params file's own pipeline for ``section``, and how it is known: what its
    inputs hold, or, for an input not written yet, the section of the same file that writes it (a
    recipe that builds a base says its family: ``StageConfig.family_written``; the repository's
    defaults register theirs, agd_pipeline.config.register_config). None if unknown."""
    if depth > 4 or section not in CONFIG_CLASSES:
        return None
    cls = CONFIG_CLASSES[section]
    values = {**built_in_values(cls), **_section(params, section)}
    written = cls.family_written(values)
    if written is not None:  # a recipe that builds a base: its settings say the family
        family = _family_name(written)
        return (family, f"its base {values['out_dir']} is what its [{section}] stage writes") if family else None
    for name, kind in _inputs(section).items():
        value = str(values.get(name) or "")
        family = input_family(kind, value, str(values.get("revision") or ""))
        if family:
            return family, f"its {section}.{name} {value}"
        for producer in _producers(kind):
            produced = {**built_in_values(CONFIG_CLASSES[producer]), **_section(params, producer)}
            if producer in params and _same_folder(str(produced.get("out_dir", "")), value):
                found = params_family(params, producer, depth + 1)
                if found:
                    return found
    return None


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path: what the loaders try on the Hugging Face hub."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def check_family(config, sources: dict[str, str], params: dict | None, label: str) -> str | None:
    """Refuse an input given on the command line (a base, store or adapters) whose family differs from
    the params file's own pipeline while the output folder is not given on the command line: the
    outputs would land in that pipeline's folder (another model's DVC output), and the next stage
    would fail on them. Raises ConfigError in one line, before anything is read or written. Returns a
    warning when the given input's family cannot be told here (a hub id not in the local cache):
    nothing is refused on a guess. None otherwise, and when no params file is read."""
    section, inputs = config.section, type(config).inputs
    if params is None or not inputs or sources.get("out_dir", "").startswith("--"):
        return None
    given = [(name, kind) for name, kind in inputs.items()
             if sources.get(name, "").startswith("--") and getattr(config, name)]
    own = params_family(params, section) if given else None
    if own is None:
        return None  # nothing given on the command line, or the params file's pipeline is of no known family
    own_family, evidence = own
    from . import families

    where = f"{section}.out_dir {config.out_dir}" + (
        f" (from {sources['out_dir']})" if sources["out_dir"] != BUILT_IN else f" (built-in, with {label})")
    for name, kind in given:
        value = getattr(config, name)
        family = input_family(kind, value, getattr(config, "revision", ""))
        if family is None:
            if kind == "base" and looks_like_hub_id(value):
                return (f"cannot tell the family of {option_name(name)} {value} offline (not in the Hugging Face "
                        f"cache), so {where} is used unchecked; it belongs to the params file's "
                        f"{families.get(own_family).title} pipeline: pass --out-dir if this base is another family")
            continue  # a missing folder: the stage itself says what is wrong with it
        if family != own_family:
            theirs, ours = families.get(family).title, families.get(own_family).title
            raise ConfigError(
                f"{where} belongs to the params file's {ours} pipeline ({evidence}), but {option_name(name)} "
                f"{value} {WHAT[kind]} the {theirs} family; "
                "nothing was written: pass --out-dir for its outputs, or a --params file of its own")
    return None


def warn(message: str | None) -> None:
    """One ``warning: ...`` line on stderr (main process only)."""
    if message and main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)
