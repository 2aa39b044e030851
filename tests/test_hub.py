"""Adapters on the Hugging Face Hub, offline: loading a hub id from a hub cache laid out as
huggingface_hub lays it out (revision of a commit and of a branch, subfolder), the one-line error for
an id that is not cached, the exact files a push would upload (never lock files or checkpoints), and
the model card: it parses, its metadata is ours with no local path, and its usage snippet runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, scan_cache_dir, try_to_load_from_cache

from agd_pipeline.adapters import (AdaptedModel, AdapterConfig, default_condition_on, read_adapter_config,
                                   save_adapters)
from agd_pipeline.errors import ConfigError, ModelError
from agd_pipeline.hub import portable_config, upload_operations
from agd_pipeline.locks import LOCK_FILE
from agd_pipeline.modelcard import LIBRARY_NAME, LOCAL_BASE_PLACEHOLDER, REPO_PLACEHOLDER, render_model_card
from agd_pipeline.models import load_base_model
from agd_pipeline.pipelines import AGDAdapters

from test_pipelines import make_dit_pipeline

REPO_ID = "someone/agd-tiny-dit"
COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40
STEPS = 2


# ------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory) -> Path:
    return make_dit_pipeline(tmp_path_factory.mktemp("hub") / "dit-pipeline")


@pytest.fixture(scope="module")
def dit_base(dit_pipeline):
    return load_base_model(str(dit_pipeline))


def write_nudged_adapters(base, folder: Path, seed: int) -> Path:
    """Adapters with every weight nudged (fresh ones are exact no-ops), recording a sampler and a w range
    as training does."""
    config = AdapterConfig(width=8, embed_dim=16, num_classes=base.num_classes,
                           condition_on=default_condition_on("class"))
    model = AdaptedModel(base, config)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=noise))
    save_adapters(model, folder, extra={"sampler": {"scheduler": "DDIMScheduler", "num_steps": STEPS},
                                        "guidance": {"min": 1.0, "max": 6.0}, "negative_prompt": ""})
    model.remove()
    return folder


@pytest.fixture(scope="module")
def adapter_folders(dit_base, tmp_path_factory) -> dict[str, Path]:
    """Two adapter folders of other weights (two commits), with what training leaves beside them."""
    root = tmp_path_factory.mktemp("adapter-folders")
    folders = {name: write_nudged_adapters(dit_base, root / name, seed) for name, seed in (("one", 1), ("two", 2))}
    for folder in folders.values():
        (folder / LOCK_FILE).write_text("")
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "state.json").write_text("{}")
        (folder / "loss.csv").write_text("step,loss\n")
        (folder / "resolved_config.json").write_text('{"store": "/home/someone/data/trajectories"}')
        (folder / "validation").mkdir()
        for step in (1, 2):
            (folder / "validation" / f"step-{step:06d}.png").write_bytes(b"\x89PNG grid %d" % step)
    return folders


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def operation_bytes(operation) -> bytes:
    source = operation.path_or_fileobj
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def planned_upload(folder: Path, repo_id: str, monkeypatch, **kwargs) -> tuple[list, dict]:
    """What push_to_hub would send: HfApi's create_repo and create_commit replaced by recorders."""
    calls: dict = {}

    def create_repo(self, repo_id, **options):
        calls["create_repo"] = (repo_id, options)

    def create_commit(self, repo_id, operations, **options):
        calls["create_commit"] = (repo_id, options)
        calls["operations"] = list(operations)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert AGDAdapters.from_pretrained(folder).push_to_hub(repo_id, **kwargs) == "commit-info"
    return calls["operations"], calls


def put_in_hub_cache(cache_dir: Path, repo_id: str, commit: str, files: dict[str, bytes],
                     refs: tuple[str, ...] = ()) -> Path:
    """A commit of a model repository in a hub cache, in huggingface_hub's layout
    (https://huggingface.co/docs/huggingface_hub/guides/manage-cache): files under
    ``models--<namespace>--<name>/blobs/<hash>`` (sha256 for LFS files, git's blob sha1 otherwise),
    ``snapshots/<commit>/<path>`` relative symlinks to them, and ``refs/<branch>`` holding the commit.
    huggingface_hub has no public function that fills its cache without a download, so the tests build
    it and check it with huggingface_hub's own readers."""
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for path, data in files.items():
        lfs = path.endswith((".safetensors", ".png"))
        blob_name = digest(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = storage / "blobs" / blob_name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage / "snapshots" / commit


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE for huggingface_hub even if the environment forgot it: a test never reaches the hub."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, adapter_folders, monkeypatch) -> Path:
    """A hub cache holding REPO_ID as a push of folder "one" at the root (COMMIT_1, branch main) and of
    folder "two" in subfolder "v2" (COMMIT_2, branch "next"), both built from the push's operations."""
    cache = tmp_path / "hub-cache"
    first, _ = planned_upload(adapter_folders["one"], REPO_ID, monkeypatch)
    second, _ = planned_upload(adapter_folders["two"], REPO_ID, monkeypatch, path_in_repo="v2")
    put_in_hub_cache(cache, REPO_ID, COMMIT_1, {op.path_in_repo: operation_bytes(op) for op in first}, ("main",))
    put_in_hub_cache(cache, REPO_ID, COMMIT_2, {op.path_in_repo: operation_bytes(op) for op in [*first, *second]},
                     ("next",))
    return cache


def weights_digest(adapters: AGDAdapters) -> str:
    return digest((adapters.folder / "adapters.safetensors").read_bytes())


# ------------------------------------------------------------------------------------ pushing


def test_push_uploads_only_the_adapter_files(adapter_folders, monkeypatch, offline):
    folder = adapter_folders["one"]
    operations, calls = planned_upload(folder, REPO_ID, monkeypatch, private=True)
    assert calls["create_repo"] == (REPO_ID, {"token": None, "private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["create_commit"][0] == REPO_ID
    uploaded = {op.path_in_repo: operation_bytes(op) for op in operations}
    # the newest validation grid only; never the lock, checkpoints, losses or the resolved config
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapters.safetensors",
                                "validation/step-000002.png"]
    assert not any(name.startswith((LOCK_FILE, "checkpoint", "loss", "resolved_config")) for name in uploaded)
    for name in ("adapters.safetensors", "validation/step-000002.png"):
        assert uploaded[name] == (folder / name).read_bytes(), name
    # the config as published: the local base's path cut to its folder name (test_published_config_...)
    published = json.loads(uploaded["adapter_config.json"])
    assert str(folder.parent) not in uploaded["adapter_config.json"].decode()
    assert published["base_model"]["id"] == Path(read_adapter_config(folder)["base_model"]["id"]).name
    card = uploaded["README.md"].decode()
    assert f"AGDAdapters.from_pretrained({REPO_ID!r})\n" in card and REPO_PLACEHOLDER not in card
    assert "push_to_hub" not in card_snippet(card)  # the placeholder's comment went with it
    assert str(folder) not in card and str(folder.parent) not in card

    operations, _ = planned_upload(folder, REPO_ID, monkeypatch, path_in_repo="dit/v1", include_validation=False)
    assert sorted(op.path_in_repo for op in operations) == ["dit/v1/README.md", "dit/v1/adapter_config.json",
                                                            "dit/v1/adapters.safetensors"]
    card = operation_bytes(next(op for op in operations if op.path_in_repo.endswith("README.md"))).decode()
    assert f"AGDAdapters.from_pretrained({REPO_ID!r}, subfolder='dit/v1')" in card


@pytest.mark.bad_input
def test_push_refuses_damaged_adapters_before_touching_the_hub(adapter_folders, tmp_path, monkeypatch):
    import shutil

    folder = shutil.copytree(adapter_folders["one"], tmp_path / "copy")
    data = bytearray((folder / "adapters.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "adapters.safetensors").write_bytes(bytes(data))
    touched = []
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: touched.append("create_repo"))
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: touched.append("create_commit"))
    with pytest.raises(ModelError, match="differ from the sha256.*nothing was published"):
        upload_operations(folder, REPO_ID)
    with pytest.raises(ModelError, match="nothing was published"):
        AGDAdapters.from_pretrained(folder).push_to_hub(REPO_ID)
    with pytest.raises(ConfigError, match="not a hub repository id"):
        AGDAdapters.from_pretrained(adapter_folders["one"]).push_to_hub("/a/local/path")
    assert touched == []


def test_the_published_config_names_no_local_path_and_loads(adapter_folders, dit_base, tmp_path, monkeypatch):
    """adapter_config.json as pushed: the training machine's folders (the local base, the store, the output
    folder) cut to their final names and listed under local_paths_redacted, its digest recomputed so that
    it loads; the local file stays as it was."""
    folder = tmp_path / "adapters"
    shutil.copytree(adapter_folders["one"], folder)
    local = read_adapter_config(folder)
    extra = {k: local[k] for k in ("sampler", "guidance", "negative_prompt")}
    extra["training"] = {"store": "/home/someone/data/trajectories", "out_dir": str(folder), "base_model": ""}
    extra["store"] = {"path": "/home/someone/data/trajectories", "fingerprint": "f" * 32}
    model = AdaptedModel(dit_base, AdapterConfig(**local["adapter"]))
    save_adapters(model, folder, extra=extra)
    model.remove()
    before = (folder / "adapter_config.json").read_bytes()

    operations, _ = planned_upload(folder, REPO_ID, monkeypatch)
    data = next(operation_bytes(op) for op in operations if op.path_in_repo == "adapter_config.json")
    assert (folder / "adapter_config.json").read_bytes() == before  # the local file is not changed
    text = data.decode()
    assert "/home/someone" not in text and str(tmp_path) not in text, text
    published = json.loads(text)
    assert published["base_model"]["id"] == Path(local["base_model"]["id"]).name
    assert published["training"]["store"] == published["store"]["path"] == "trajectories"
    assert published["training"]["out_dir"] == "adapters" and published["training"]["base_model"] == ""
    assert published["local_paths_redacted"] == ["base_model.id", "training.store", "training.out_dir",
                                                 "store.path"]
    assert published["base_model"]["weights_fingerprint"] == local["base_model"]["weights_fingerprint"]
    (tmp_path / "pulled").mkdir()  # what a download gets loads: its digest is that of what was published
    for op in operations:
        if op.path_in_repo in ("adapter_config.json", "adapters.safetensors"):
            (tmp_path / "pulled" / op.path_in_repo).write_bytes(operation_bytes(op))
    assert read_adapter_config(tmp_path / "pulled") == published


def test_a_hub_base_id_is_published_whole():
    config = {"base_model": {"id": "facebook/DiT-XL-2-256"}, "training": {"base_model": "facebook/DiT-XL-2-256",
                                                                           "store": "data/trajectories"}}
    published = portable_config(config)
    assert published["base_model"]["id"] == published["training"]["base_model"] == "facebook/DiT-XL-2-256"
    assert published["training"]["store"] == "trajectories"
    assert published["local_paths_redacted"] == ["training.store"]
    assert config["training"]["store"] == "data/trajectories"  # the caller's dict is left alone
    assert portable_config({"base_model": {"id": "facebook/DiT-XL-2-256"}}) == {
        "base_model": {"id": "facebook/DiT-XL-2-256"}}  # nothing local: nothing added


# ------------------------------------------------------------------------------------ loading


def test_the_test_cache_is_one_huggingface_hub_reads(hub_cache):
    """Guards the layout the loading tests rely on: huggingface_hub's own readers see it."""
    (repo,) = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == REPO_ID and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {COMMIT_1: {"main"}, COMMIT_2: {"next"}}
    found = try_to_load_from_cache(REPO_ID, "v2/adapter_config.json", cache_dir=hub_cache, revision="next")
    assert isinstance(found, str) and Path(found).is_file()


def test_a_hub_id_loads_from_the_cache_by_branch_commit_and_subfolder(hub_cache, adapter_folders, offline):
    local = {name: weights_digest(AGDAdapters.from_pretrained(folder)) for name, folder in adapter_folders.items()}
    snapshots = hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots"

    default = AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache)  # branch main
    assert default.folder == snapshots / COMMIT_1 and weights_digest(default) == local["one"]
    by_commit = AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache, revision=COMMIT_2, subfolder="v2")
    assert by_commit.folder == snapshots / COMMIT_2 / "v2" and weights_digest(by_commit) == local["two"]
    by_branch = AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache, revision="next", subfolder="v2",
                                            local_files_only=True, token=False)
    assert by_branch.folder == by_commit.folder and by_branch.config == by_commit.config
    root_of_next = AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache, revision="next")
    assert weights_digest(root_of_next) == local["one"]
    assert AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache).num_steps == STEPS


def test_adapters_from_the_hub_cache_sample_as_the_local_folder(hub_cache, adapter_folders, dit_pipeline, offline):
    import diffusers

    def run(adapters):
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(dit_pipeline))
        pipe.set_progress_bar_config(disable=True)
        with adapters.applied(pipe):
            return pipe(class_labels=[3], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    from_hub = run(AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache, revision="next", subfolder="v2"))
    assert (from_hub == run(AGDAdapters.from_pretrained(adapter_folders["two"]))).all()
    assert not (from_hub == run(AGDAdapters.from_pretrained(adapter_folders["one"]))).all()  # not vacuous


@pytest.mark.bad_input
def test_an_id_that_is_not_cached_says_what_to_do_in_one_line(hub_cache, tmp_path, offline):
    for kwargs in ({"cache_dir": hub_cache, "revision": "no-such-branch"}, {"cache_dir": tmp_path / "empty"},
                   {"cache_dir": tmp_path / "empty", "local_files_only": True}):
        repo = REPO_ID if "revision" in kwargs else "someone/not-cached"
        with pytest.raises(ModelError) as caught:
            AGDAdapters.from_pretrained(repo, **kwargs)
        message = str(caught.value)
        assert "\n" not in message and repo in message, message
        assert "not in the hub cache" in message and f"hf download {repo}" in message, message
    with pytest.raises(ModelError, match=r"no adapter_config\.json or adapters\.safetensors|no adapters"):
        AGDAdapters.from_pretrained(REPO_ID, cache_dir=hub_cache, subfolder="elsewhere")
    with pytest.raises(ModelError, match="no such adapter folder, and not a hub id"):
        AGDAdapters.from_pretrained(tmp_path / "missing" / "adapters")


@pytest.mark.bad_input
def test_a_revision_of_a_local_folder_is_refused(adapter_folders):
    with pytest.raises(ConfigError, match="applies to hub ids, but this is a local folder"):
        AGDAdapters.from_pretrained(adapter_folders["one"], revision="main")


# ------------------------------------------------------------------------------------ the card


def card_snippet(card: str) -> str:
    found = re.search(r"```python\n(.*?)```", card, re.S)
    assert found, "the card has no python block"
    return found.group(1)


def test_the_card_parses_is_ours_and_names_no_local_path(adapter_folders):
    folder = adapter_folders["one"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == LIBRARY_NAME
    assert card.data.get("base_model") is None  # stage one recorded a local folder
    assert {"diffusers", "guidance-distillation", "adapter"} <= set(card.data.tags)
    assert card.data.license
    config = AGDAdapters.from_pretrained(folder).config
    recorded = config["base_model"]["id"]
    assert Path(recorded).is_dir() and recorded not in card.content and "/tmp" not in card.content
    assert card.data.get("agd")["guidance_range"] == [1.0, 6.0] and card.data.get("agd")["num_steps"] == STEPS
    assert "a local DiTTransformer2DModel base" in card.content and "DDIMScheduler trajectories of 2 steps" in card.text

    hub = {**config, "base_model": {**config["base_model"], "id": "facebook/DiT-XL-2-256", "revision": "abc123"}}
    card = ModelCard(str(render_model_card(hub, repo_id=REPO_ID)))
    assert card.data.base_model == "facebook/DiT-XL-2-256" and card.data.get("base_model_relation") == "adapter"
    assert card.data.get("agd")["base_model_revision"] == "abc123"
    assert "DiffusionPipeline.from_pretrained('facebook/DiT-XL-2-256', revision='abc123')" in card_snippet(card.text)


def test_the_published_cards_snippet_runs(hub_cache, dit_pipeline, monkeypatch, tmp_path, offline):
    """The card as pushed, its snippet run as it is, with only the local base's placeholder pointed at the
    tiny pipeline; the adapters come from the hub cache by the pushed id."""
    card = (hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT_1 / "README.md").read_text()
    code = card_snippet(card)
    assert LOCAL_BASE_PLACEHOLDER in code and f"from_pretrained({REPO_ID!r})" in code
    code = code.replace(LOCAL_BASE_PLACEHOLDER, str(dit_pipeline))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.chdir(tmp_path)
    import functools

    from diffusers import DiTTransformer2DModel

    evaluations = []
    forward = DiTTransformer2DModel.forward

    @functools.wraps(forward)
    def counting(self, hidden_states, *args, **kwargs):  # after AGD's pre-hook cut CFG's doubled batch
        evaluations.append(hidden_states.shape[0])
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(DiTTransformer2DModel, "forward", counting)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)  # noqa: S102 - our own snippet
    assert (tmp_path / "agd.png").is_file()
    assert evaluations == [1] * STEPS  # one evaluation per step on batch 1: the adapters, not CFG's 2
    assert namespace["adapters"].pipeline is None and namespace["adapters"].folder.is_relative_to(hub_cache)


def test_a_recorded_base_is_a_hub_id_only_when_it_cannot_be_a_local_folder(tmp_path, monkeypatch):
    from agd_pipeline.modelcard import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "base").mkdir(parents=True)
    assert not is_hub_id("data/base")  # a relative folder that looks like namespace/name
    assert is_hub_id("facebook/DiT-XL-2-256") and is_hub_id("stabilityai/stable-diffusion-2-1")
    for local in ("/tmp/base", "./base", "~/base", "data/base/transformer", "C:\\models\\base", ""):
        assert not is_hub_id(local), local


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_text_models_card_snippet_runs(family, text_pipeline_dirs, tmp_path, monkeypatch):
    """The text families' snippet (prompt, the recorded negative prompt, the recorded scheduler) on a tiny
    pipeline, with the adapters named by their local folder."""
    import functools

    from agd_pipeline.models import encode_prompts
    from test_pipelines import adapter_config

    folder = text_pipeline_dirs[family]
    base = load_base_model(str(folder))
    config = adapter_config(base, {family: encode_prompts(base, ["a cat"], "")}, "cross_attention")
    model = AdaptedModel(base, config)
    recorded = {"scheduler": type(base.scheduler).__name__, "num_steps": STEPS}
    save_adapters(model, tmp_path / "adapters", extra={"sampler": recorded, "guidance": {"min": 1.0, "max": 12.0},
                                                       "negative_prompt": "blurry"})
    model.remove()
    adapters_config = AGDAdapters.from_pretrained(tmp_path / "adapters").config
    code = card_snippet(str(render_model_card(adapters_config, repo_id=str(tmp_path / "adapters"))))
    assert "negative_prompt=adapters.negative_prompt" in code and f"num_inference_steps={STEPS}" in code
    code = code.replace(LOCAL_BASE_PLACEHOLDER, str(folder))
    net_class = type(base.net)
    forward = net_class.forward
    evaluations = []

    @functools.wraps(forward)
    def counting(self, sample, *args, **kwargs):
        evaluations.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(net_class, "forward", counting)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)  # noqa: S102 - our own snippet
    assert (tmp_path / "agd.png").is_file() and evaluations == [1] * STEPS
