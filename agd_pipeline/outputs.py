"""Output folders: every command that writes owns its output folder.

* :func:`owned_output` (train, evaluate, base, text_data, sample): refuse an output folder inside an
  input (or holding one), refuse a folder that holds anything this command did not write, take the
  folder's writer lock (:mod:`agd_pipeline.locks`), and record ``resolved_config.json`` at once, so
  that a run killed before its first output still leaves a folder that is recognisably its own.
* Folders that a stage replaces as a whole (a model folder: finetune, text_base):
  :func:`check_replaceable` refuses a folder the stage did not write, the new folder is assembled
  next to it and swapped in, so a killed run leaves the previous one whole; their lock is a sibling
  file (``.<name>.agd.lock``) because the folder itself is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import ConfigError, ModelError
from .locks import LOCK_FILE, FolderLock

RESOLVED_CONFIG = "resolved_config.json"


# the one key a resolved_config.json may hold beside its stage's section: what the process ran
# under that changes results besides the settings (train: agd_pipeline.training.runtime_record)
RUNTIME = "runtime"


def write_resolved(config, folder: str | os.PathLike, name: str = RESOLVED_CONFIG, runtime: dict | None = None) -> None:
    """Write the whole resolved config next to the outputs (EDM-style), for the record; it also
    marks the folder as this stage's own (:func:`resolved_section`). ``runtime``, where given, is
    recorded beside the section (``{"train": {...}, "runtime": {...}}``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (name + ".tmp")
    record = {config.section: dataclasses.asdict(config), **({RUNTIME: runtime} if runtime is not None else {})}
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / name)


def resolved_section(folder: Path) -> str | None:
    """The stage whose resolved_config.json lies in ``folder`` (None: none, or not one of ours): a
    record of one section, or of one section followed by ``runtime``."""
    try:
        record = json.loads((folder / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or not record:
        return None
    section, *rest = record
    return section if section != RUNTIME and rest in ([], [RUNTIME]) else None


def check_outside_inputs(out: Path, key: str, inputs: Iterable) -> None:
    """Refuse an output folder that is, lies inside, or holds one of the command's inputs."""
    where = out.resolve()
    for given in inputs:
        if not given or not Path(given).exists():
            continue  # a hub id, or an input the command itself refuses as missing
        source = Path(given).resolve()
        if where == source or source in where.parents:
            raise ConfigError(f"{key}: {out} lies inside the input {given}; writing there would change that "
                              "input. Choose an output folder outside it")
        if where in source.parents:
            raise ConfigError(f"{key}: {out} holds the input {given}; writing there would mix outputs with it. "
                              "Choose an output folder that does not contain the inputs")


# never written by a command, so never in its way: the lock, and the .gitignore DVC writes into an
# output folder for the cached outputs inside it (data/eval/.gitignore lists /grids, say)
NOT_OUTPUTS = {LOCK_FILE, ".gitignore"}


def _listing(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in NOT_OUTPUTS) if out.is_dir() else []


def claim_output(out: Path, key: str, command: str, ours: Callable[[Path], bool], inputs: Iterable = (),
                 own_name: Callable[[str], bool] | None = None) -> bool:
    """Check, changing nothing, that ``command`` may write into ``out``: it is outside every input,
    and it is missing, empty, or an earlier output of this command (``ours``) holding nothing else
    (``own_name``: the names this command writes; None accepts any). Returns whether ``out`` holds
    an earlier output; raises ConfigError naming what is in the way otherwise."""
    check_outside_inputs(out, key, inputs)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}: {out} is a file, not a folder; choose another output folder")
    names = _listing(out)
    if not names:
        return False
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    if not ours(out):
        raise ConfigError(f"{key}: {out} already holds files that {command} did not write ({', '.join(names[:3])}"
                          f"{more}); nothing was changed. Choose an empty or new folder, or move those files away")
    foreign = [name for name in names if own_name is not None and not own_name(name)]
    if foreign:
        raise ConfigError(f"{key}: {out} holds {', '.join(foreign[:3])} beside an earlier {command} output; "
                          f"{command} did not write {'it' if len(foreign) == 1 else 'them'} and will not mix with "
                          "them; nothing was changed. Move them away, or choose another folder")
    return True


@contextlib.contextmanager
def owned_output(config, inputs: Iterable = (), ours: Callable[[Path], bool] | None = None,
                 own_name: Callable[[str], bool] | None = None, record: bool = True) -> Iterator[bool]:
    """Own ``config.out_dir`` for the block: checked by :func:`claim_output` (before anything is
    created there, then again under the lock), locked against a second writer, and marked with
    ``resolved_config.json`` (unless ``record`` is false: the caller writes it once it has decided
    to go on). ``ours`` recognises earlier outputs besides that record. Yields whether the folder
    held an earlier output of this command."""
    out, key, command = Path(config.out_dir), config.key("out_dir"), f"stages.{config.section}"
    inputs = list(inputs)

    def own(folder: Path) -> bool:
        return resolved_section(folder) == config.section or bool(ours and ours(folder))

    claim_output(out, key, command, own, inputs, own_name)
    with FolderLock(out, command):
        earlier = claim_output(out, key, command, own, inputs, own_name)  # as it is now nobody else writes it
        if record:
            write_resolved(config, out)
        yield earlier


@contextlib.contextmanager
def replacing_output(out: Path, key: str, command: str, inputs: Iterable = ()) -> Iterator[None]:
    """For a folder replaced as a whole: refuse one inside an input, and hold a sibling lock file
    (``.<name>.agd.lock`` next to it, removed at the end) for the block, so two runs cannot swap in
    over each other."""
    check_outside_inputs(out, key, inputs)
    with FolderLock(out.parent, command, lock_file=f".{out.name}{LOCK_FILE}"):
        yield


def check_replaceable(out: Path, key: str, description_prefix: str, entries: set[str], what: str) -> None:
    """Refuse, before any work, to replace ``out`` unless it is missing, empty, or this stage's own
    earlier output: an agd_base.json whose description starts with ``description_prefix`` and
    nothing outside ``entries``."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        meta = json.loads((out / "agd_base.json").read_text())
        ours = isinstance(meta, dict) and str(meta.get("description", "")).startswith(description_prefix)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False  # missing or unreadable: not provably this stage's folder
    foreign = sorted(p.name for p in out.iterdir() if p.name not in entries)
    if not ours or foreign:
        why = f"it holds {', '.join(foreign[:3])}" if ours else f"it is not {what} (no agd_base.json saying so)"
        raise ModelError(f"{key}: {out} exists and {why}; nothing was changed. Choose another folder, or move "
                         "that one away")


def staging_folder(out: Path) -> Path:
    """An empty folder next to ``out`` to assemble the new output in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` (empty, missing, or checked by :func:`check_replaceable`) by ``staging``."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)
