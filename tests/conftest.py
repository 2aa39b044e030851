"""Shared fixtures: tiny random-init diffusers models written as real model folders, and a tiny
trajectory store generated from one of them. Everything is CPU-sized and built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Never reach for the Hub from a test. One intra-op thread: the models are tiny, and on a small
# shared machine OpenMP's thread hand-off costs milliseconds per layer call (over 100x the work).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The record of verified shards (agd_pipeline.store.verified_cache) goes to a folder of this session,
# never to the user's ~/.cache; subprocesses inherit it.
os.environ["AGD_CACHE_DIR"] = tempfile.mkdtemp(prefix="agd-test-cache-")
atexit.register(shutil.rmtree, os.environ["AGD_CACHE_DIR"], ignore_errors=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from agd_pipeline.config import GenerateConfig, load_config  # noqa: E402
from agd_pipeline.locks import LOCK_FILE  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The test folders mirror the code (tests/store/, tests/training/, ...; no __init__.py, so every test
# file's basename is unique). Tests share helpers across folders (`from test_training import
# train_config`, `from tiny_pipelines import ...`): every folder of the suite is importable from
# any test, whichever file pytest runs first.
for _folder in sorted(p for p in Path(__file__).resolve().parent.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
# `stages/`, `defaults/` and `benchmarks/` are the repository's, not installed (only agd_pipeline is): the tests'
# `python -m stages.X` subprocesses that run in a scratch folder find them as a user's would from the
# repository root
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

# evaluate.judge of the embedded defaults (their digit classifiers): what every params file of theirs sets
EMBEDDED_JUDGE = "defaults.judges:embedded_judges"

TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8, patch_size=2,
                in_channels=1, out_channels=1, num_embeds_ada_norm=10, norm_num_groups=1)

# The tiny store every store/training test starts from: 10 classes x 2 trajectories, 4 steps,
# shards of 8 (8 + 8 + 4 trajectories), batches of 4.
STORE_SETTINGS = dict(trajectories_per_class=2, num_steps=4, shard_size=8, batch_size=4,
                      guidance_min=1.0, guidance_max=6.0, seed=0, device="cpu")


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=False)


def make_dit(seed: int = 0, perturb: float = 0.02, **overrides):
    """A random-init DiT; every parameter gets a little noise so no layer is trivially zero."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(**{**TINY_DIT, **overrides})
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(perturb * torch.randn_like(p))
    return net.eval()


def write_base_folder(folder: Path, net, scheduler=None) -> Path:
    """The layout the embedded default writes: model_index.json + transformer/ + scheduler/."""
    from agd_pipeline.models import save_dit_folder

    return save_dit_folder(folder, net, scheduler or make_scheduler())


def make_base_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    return write_base_folder(folder, make_dit(seed, **overrides))


def generate_store(base_dir: Path, out_dir: Path, **overrides):
    """Run stage one in-process; returns (config, summary)."""
    from agd_pipeline.config import GenerateConfig, load_config
    from agd_pipeline.generation import generate

    config = load_config(GenerateConfig, {**STORE_SETTINGS, "base_model": str(base_dir),
                                          "out_dir": str(out_dir), **overrides})
    summary = generate(config, progress=False, log=lambda *a, **k: None)
    return config, summary


def write_untrained_adapters(base_dir: Path, folder: Path, num_steps: int) -> Path:
    """An adapter folder as stages.train writes it, from untrained adapters on the tiny class DiT
    (commands that only read adapters need no training)."""
    from agd_pipeline.adapters import AdaptedModel, AdapterConfig, save_adapters
    from agd_pipeline.models import load_base_model

    base = load_base_model(str(base_dir), with_vae=False)
    config = AdapterConfig(width=8, embed_dim=16, num_classes=base.num_classes,
                           condition_on=["guidance", "timestep", "class"])
    model = AdaptedModel(base, config)
    save_adapters(model, folder, extra={"training": {}, "sampler": {"num_steps": num_steps},
                                        "guidance": {"min": 1.0, "max": 6.0}, "negative_prompt": ""})
    model.remove()
    return folder


def read_all_shards(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """{shard name: {array name: numpy array}} for every shard listed in the manifest: its data,
    without the arrays a Zarr shard derives for other tools (schema.DERIVED_ARRAYS)."""
    from agd_pipeline.store import TrajectoryStore
    from agd_pipeline.store.schema import DERIVED_ARRAYS

    store = TrajectoryStore(root)
    out = {}
    for entry in store.shards:
        group = store.open_shard(entry["name"])
        out[entry["name"]] = {name: group[name][:] for name in sorted(group.array_keys())
                              if name not in DERIVED_ARRAYS}
    return out


# Quiet in-process stage calls, and the listing and generate config the store/lock/checkpoint tests share.
QUIET = dict(progress=False, log=lambda *a, **k: None)


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != LOCK_FILE)


def generate_config(base, out, **overrides):
    return load_config(GenerateConfig, {**STORE_SETTINGS, "base_model": str(base), "out_dir": str(out), **overrides})


# Calling a command's main in-process, and the one-line error and the folder snapshot the
# output-ownership tests check (commands/, training/).
def call(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def one_error_line(rc, captured, expect: str) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert expect in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_argv(store, out, *extra) -> list[str]:
    return ["--store", str(store), "--out-dir", str(out), "--steps", "4", "--batch-size", "8", "--width", "8",
            "--embed-dim", "16", "--device", "cpu", "--checkpoint-every", "0", "--validate-every", "-1",
            "--no-progress", *extra]


def run_cli(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_main(module: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    """``python -m module args`` in this process: the stage's own ``main(argv)``, its stdout and stderr
    captured, from the repository root (or ``cwd``). For command-line tests of stages whose subprocess would spend
    most of its time importing diffusers again (about 8 s per call here); tests that kill, race or
    time a process keep :func:`run_cli`."""
    import contextlib
    import importlib
    import io

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as exit_:  # argparse's usage errors, --help
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code or 0, out.getvalue(),
                                       err.getvalue())


def pytest_configure(config):
    # agd_pipeline.store silences this zarr warning at import; pytest's per-phase warning capture
    # drops filters added while collecting, so repeat it here.
    config.addinivalue_line("filterwarnings", "ignore:Consolidated metadata is currently not part")
    config.addinivalue_line("filterwarnings", "ignore:Numcodecs codecs are not in the Zarr version 3")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    folder = make_base_folder(tmp_path_factory.mktemp("tiny_base") / "base", seed=0)
    # Guard against a vacuous fixture: the network must say something, and depend on the class.
    net = make_dit(0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 500)
    with torch.no_grad():
        cond = net(x, timestep=t, class_labels=torch.tensor([1, 2, 3, 4])).sample
        uncond = net(x, timestep=t, class_labels=torch.full((4,), 10)).sample
    assert cond.abs().mean() > 1e-2, "tiny DiT output is trivially zero"
    assert (cond - uncond).abs().mean() > 1e-3, "tiny DiT ignores the class: CFG tests would be vacuous"
    return folder


@pytest.fixture(scope="session")
def text_pipeline_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD, SDXL and SD3 pipeline folders, built once. Tests read them, never write into them."""
    from tiny_pipelines import TEXT_FAMILY_NAMES, tiny_builder

    root = tmp_path_factory.mktemp("text_pipelines")
    return {family: tiny_builder(family)(root / family) for family in TEXT_FAMILY_NAMES}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_base_dir) -> Path:
    """A complete store. Tests must not modify it: copy it (shutil.copytree) first."""
    root = tmp_path_factory.mktemp("tiny_store") / "store"
    generate_store(tiny_base_dir, root)
    return root


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    return root


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory) -> Path:
    """A finished adapter folder of stages.train (4 steps)."""
    import stages.train  # the repository's commands, imported when a test needs them

    out = tmp_path_factory.mktemp("owned") / "adapters"
    assert call(stages.train.main, train_argv(tiny_store, out)) == 0
    return out


# The stores of the tar-format and loader tests (store/test_webdataset.py, training/test_loader.py)
# chunks as large as shards: a Zarr chunk row and a tar shard are then the same loader unit
SETTINGS = {**STORE_SETTINGS, "chunk_bytes": 4096}


@pytest.fixture(scope="module")
def zarr_store(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "zarr"
    generate_store(tiny_base_dir, root, **SETTINGS)
    return root


@pytest.fixture(scope="module")
def tar_store(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "tar"
    generate_store(tiny_base_dir, root, **SETTINGS, format="webdataset")
    return root
