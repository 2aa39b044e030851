"""Adapter folders on the Hugging Face Hub: load one by hub id, publish one.

:func:`resolve_adapter_folder` turns a local folder or a hub id (with ``revision``, ``subfolder``,
``token``, ``cache_dir``, ``local_files_only``) into a local folder, downloading through
``huggingface_hub.snapshot_download`` only the two files loading needs (the weights and
adapter_config.json) into the usual hub cache, so ``HF_HUB_OFFLINE=1`` works from that cache.

:func:`push_adapters` publishes exactly the adapter files: adapters.safetensors and
adapter_config.json (checked against their digests first: what is published must load), the model
card with the repository's id in its snippet, and the newest validation grid. Never the lock file,
checkpoints, loss.csv, tracking logs or resolved_config.json (local paths of the training machine);
the config is published with its own local paths cut to their folder names (:func:`portable_config`).
The commit is built from an explicit list of ``CommitOperationAdd`` rather than from a folder
listing (``upload_folder`` globs the folder, and with hf_xet installed commits through its own
pipeline), so what is uploaded is exactly :func:`upload_operations`' list.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INTEGRITY, config_digest, read_adapter_config
from .errors import ConfigError, ModelError, command_line
from .modelcard import LIBRARY_NAME, MODEL_CARD, card_for_repository, is_hub_id, render_model_card

# what loading needs (the card and the grid are for people)
LOAD_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
VALIDATION = "validation"  # training's folder of CFG | AGD grids, validation/step-NNNNNN.png
# where adapter_config.json records a path of the training machine: (section, key, may be a hub id)
LOCAL_PATHS = (("base_model", "id", True), ("training", "store", False), ("training", "out_dir", False),
               ("training", "base_model", True), ("store", "path", False))
REDACTED = "local_paths_redacted"  # the published config's list of the keys cut to a folder name


def _in_subfolder(subfolder: str | None, name: str) -> str:
    return f"{subfolder.strip('/')}/{name}" if subfolder and subfolder.strip("/") else name


def resolve_adapter_folder(name_or_path: str | Path, *, revision: str | None = None, subfolder: str | None = None,
                           token: str | bool | None = None, cache_dir: str | Path | None = None,
                           local_files_only: bool = False) -> Path:
    """The local adapter folder for a folder path or a hub id (``namespace/name``). A hub id is
    downloaded (or, offline, found) in the hub cache; errors are one-line ModelErrors saying what to do."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if revision is not None:
            raise ConfigError(f"{name_or_path}: revision={revision!r} applies to hub ids, but this is a local "
                              "folder; check out that revision there, or pass the hub id")
        return path / subfolder if subfolder else path
    repo_id = str(name_or_path)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") > 1:
            raise HFValidationError("a path")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelError(f"{name_or_path}: no such adapter folder, and not a hub id (namespace/name); pass the "
                         f"folder `{command_line('train')}` wrote, or a hub repository id") from None
    snapshot = _download(repo_id, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                         local_files_only=local_files_only)
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    missing = [name for name in LOAD_FILES if not (folder / name).is_file()]
    if missing:
        where = f"{repo_id}" + (f" (subfolder {subfolder!r})" if subfolder else "") + f" at {revision or 'main'}"
        raise ModelError(f"{where}: no {' or '.join(missing)} in the repository's snapshot ({folder}); is it an "
                         f"adapter repository of {LIBRARY_NAME}, and is the subfolder right?")
    return folder


def _download(repo_id: str, *, revision, subfolder, token, cache_dir, local_files_only) -> str:
    """``snapshot_download`` of the adapter files only, its errors as one-line ModelErrors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = (f"{repo_id} (no local folder of that name; hub revision {revision or 'main'}"
             + (f", subfolder {subfolder!r}" if subfolder else "") + ")")
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only,
                                 allow_patterns=[_in_subfolder(subfolder, name) for name in LOAD_FILES])
    except LocalEntryNotFoundError:
        offline = "local_files_only=True" if local_files_only else (
            "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub could not be reached")
        cache = cache_dir or constants.HF_HUB_CACHE
        command = (f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
                   + (f" --cache-dir {cache_dir}" if cache_dir else ""))
        raise ModelError(f"{where}: not in the hub cache {cache} and {offline}; download it once with network "
                         f"(`{command}`), or pass its local folder") from None
    except GatedRepoError:
        raise ModelError(f"{where}: a gated repository; accept its terms on the hub and pass token= "
                         "(or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{where}: no such repository on the hub, or it is private: check the id, or pass "
                         "token= (or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}: the repository has no revision {revision!r}; pass a branch, tag or commit "
                         "it has") from None
    except HfHubHTTPError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{where}: the hub refused the download ({first[:200]}); try again, or pass a local "
                         "folder") from None


def newest_validation_grid(folder: Path) -> Path | None:
    """The last validation grid training wrote (validation/step-NNNNNN.png), or None."""
    grids = sorted((folder / VALIDATION).glob("step-*.png")) if (folder / VALIDATION).is_dir() else []
    return grids[-1] if grids else None


def published_card(folder: Path, config: dict, repo_id: str, path_in_repo: str | None) -> str:
    """The card to publish: the folder's own (which may hold the evaluation of ``stages.report
    --model-card``) when this tool wrote it, else one rendered from the config; with the snippet
    naming ``repo_id``. A card of an older release (metadata of another library) is rendered anew."""
    from huggingface_hub import ModelCard

    path = folder / MODEL_CARD
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            ours = ModelCard(text, ignore_metadata_errors=True).data.get("library_name") == LIBRARY_NAME
        except ValueError:
            ours = False
        if ours:
            return card_for_repository(text, repo_id, path_in_repo)
    return str(render_model_card(config, repo_id=repo_id, subfolder=path_in_repo))


def portable_config(config: dict) -> dict:
    """adapter_config.json as published: each local path it records (the base where it is a local
    folder, the store, the output folder) cut to its final folder name, the keys cut listed under
    "local_paths_redacted", and the config's digest recomputed over what is published, so that it
    loads. A hub id stays whole; a config with no local path comes back as it is. ``config`` is not
    changed."""
    published = copy.deepcopy(config)
    redacted = []
    for section, key, hub in LOCAL_PATHS:
        holder = published.get(section)
        value = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(value, str) or not value or (hub and is_hub_id(value)):
            continue
        parts = [part for part in re.split(r"[\\/]+", os.path.expanduser(value)) if part not in ("", ".")]
        holder[key] = parts[-1] if parts else "."
        redacted.append(f"{section}.{key}")
    if not redacted:
        return published
    published[REDACTED] = redacted
    if isinstance(published.get(INTEGRITY), dict):
        published[INTEGRITY]["config"] = config_digest(published)
    return published


def upload_operations(folder: str | Path, repo_id: str, path_in_repo: str | None = None,
                      include_validation: bool = True) -> list:
    """The ``CommitOperationAdd`` list that publishes an adapter folder: the weights and config
    (verified against their recorded sha256 first; the config with no local path, :func:`portable_config`),
    the card and the newest validation grid."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    config = read_adapter_config(folder)  # refuses an edited or damaged config
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: {ADAPTER_WEIGHTS} is missing (or not a file); re-run training "
                         f"(`{command_line('train')}`) before publishing")
    expected = (config.get(INTEGRITY) or {}).get("files", {}).get(ADAPTER_WEIGHTS)
    data = weights.read_bytes()  # the bytes checked are the bytes published
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ModelError(f"{weights}: its bytes differ from the sha256 recorded in {ADAPTER_CONFIG}; nothing was "
                         "published: re-run training to write the adapters again")
    card = published_card(folder, config, repo_id, path_in_repo)
    published = portable_config(config)
    config_file = folder / ADAPTER_CONFIG if published == config else (json.dumps(published, indent=2) + "\n").encode()
    files: list[tuple[str, Path | bytes]] = [(ADAPTER_WEIGHTS, data), (ADAPTER_CONFIG, config_file),
                                             (MODEL_CARD, card.encode("utf-8"))]
    grid = newest_validation_grid(folder) if include_validation else None
    if grid is not None:
        files.append((f"{VALIDATION}/{grid.name}", grid))
    return [CommitOperationAdd(path_in_repo=_in_subfolder(path_in_repo, name), path_or_fileobj=source)
            for name, source in files]


def push_adapters(folder: str | Path, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                  revision: str | None = None, path_in_repo: str | None = None,
                  commit_message: str = "Upload AGD adapters", create_pr: bool = False,
                  include_validation: bool = True, api=None):
    """Publish an adapter folder to ``repo_id`` (created if missing, ``exist_ok``) in one commit of
    :func:`upload_operations`; returns the hub's ``CommitInfo``. ``api``: an ``HfApi`` (or an object
    with its ``create_repo`` and ``create_commit``), for a custom endpoint or for tests."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"push_to_hub: {repo_id!r} is not a hub repository id (namespace/name)") from None
    operations = upload_operations(folder, repo_id, path_in_repo, include_validation)  # before touching the hub
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    return api.create_commit(repo_id, operations, commit_message=commit_message, token=token, revision=revision,
                             create_pr=create_pr, repo_type="model")
