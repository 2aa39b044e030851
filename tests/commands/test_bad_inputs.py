"""Bad input, as a hostile user gives it: every stage exits 2 with ONE line `error: ...` on stderr that
names the key or option, never a traceback, and never 0. Called in-process (fast); nearly every case
fails during validation, before a model loads."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import stages.base
import stages.convert
import stages.evaluate
import stages.generate
import stages.inspect
import stages.sample
import stages.train
from agd_pipeline.adapters import ADAPTER_CONFIG
from agd_pipeline.cli import stage_main
from defaults.config import BaseStageConfig
from conftest import write_untrained_adapters

pytestmark = pytest.mark.bad_input

MAIN = {"base": stages.base.main, "generate": stages.generate.main, "train": stages.train.main,
        "evaluate": stages.evaluate.main, "sample": stages.sample.main, "inspect": stages.inspect.main,
        "convert": stages.convert.main}

# Small settings, so that a case whose validation were to let it through stays short (it still fails).
PARAMS = """\
base: {out_dir: out/base, train_steps: 2, classifier_steps: 2, batch_size: 8}
generate: {out_dir: out/store, trajectories_per_class: 1, num_steps: 2, batch_size: 4, device: cpu}
train: {out_dir: out/adapters, steps: 2, batch_size: 8, width: 8, embed_dim: 16, device: cpu}
evaluate: {out_dir: out/eval, guidance_scales: [2.0], samples_per_class: 2, num_steps: 2, device: cpu}
"""

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def case(stage, *argv, expect, marks=()):
    return pytest.param(stage, list(argv), expect, id=f"{stage} {' '.join(argv)}"[:90], marks=marks)


CASES = [
    # seeds: numpy and scikit-learn reject negative ones
    *[case(stage, "--seed", "-1", expect=f"{stage}.seed") for stage in ("base", "generate", "train", "evaluate")],
    case("generate", "--seed", "99999999999999999999999", expect="generate.seed"),
    case("sample", "--seed", "-1", expect="--seed"),
    # floats: NaN, inf, negative where they make no sense
    case("train", "--weight-decay", "nan", expect="train.weight_decay"),
    case("train", "--weight-decay", "-1", expect="train.weight_decay"),
    case("train", "--learning-rate", "inf", expect="train.learning_rate"),
    case("train", "--learning-rate", "nan", expect="train.learning_rate"),
    case("base", "--learning-rate", "nan", expect="base.learning_rate"),
    case("base", "--learning-rate", "-0.1", expect="base.learning_rate"),
    case("base", "--label-dropout", "nan", expect="base.label_dropout"),
    case("base", "--ema-decay", "inf", expect="base.ema_decay"),
    case("generate", "--guidance-min", "nan", expect="generate.guidance_min"),
    case("evaluate", "--guidance-scales", "1,inf", expect="evaluate.guidance_scales"),
    case("evaluate", "--guidance-scales", "1e300", expect="evaluate.guidance_scales"),
    # ints out of range
    case("train", "--loader-workers", "-1", expect="train.loader_workers"),
    case("train", "--checkpoint-every", "-1", expect="train.checkpoint_every"),
    case("train", "--width", "99999999999999", expect="train.width"),
    case("generate", "--trajectories-per-class", "100000000000000", expect="generate.trajectories_per_class"),
    case("base", "--patch-size", "0", expect="base.patch_size"),
    case("base", "--num-heads", "3", "--head-dim", "5", expect="base.num_heads"),
    case("base", "--num-train-timesteps", "1", expect="base.num_train_timesteps"),
    case("generate", "--num-steps", "abc", expect="generate.num_steps"),
    case("generate", "--num-steps", "", expect="generate.num_steps"),
    # devices
    case("train", "--device", "cuda", expect="train.device", marks=no_gpu),
    case("evaluate", "--device", "cuda:99", expect="evaluate.device", marks=no_gpu),
    case("generate", "--device", "banana", expect="generate.device"),
    case("generate", "--device", "", expect="generate.device"),
    case("train", "--device", "meta", expect="train.device"),
    case("sample", "--device", "banana", expect="--device"),
    case("sample", "--device", "cuda", expect="--device", marks=no_gpu),
    # output folders that are files, empty, or another stage's output
    *[case(stage, "--out-dir", "{file}", expect=f"{stage}.out_dir")
      for stage in ("base", "generate", "train", "evaluate")],
    case("generate", "--out-dir", "{file}/sub", expect="generate.out_dir"),
    case("train", "--out-dir", "", expect="train.out_dir"),
    case("train", "--store", "", expect="train.store"),
    case("evaluate", "--adapters", "", expect="evaluate.adapters"),
    case("train", "--out-dir", "{store}", expect="train.out_dir"),
    case("evaluate", "--out-dir", "{base}", expect="evaluate.out_dir"),
    case("base", "--out-dir", "{store}", expect="base.out_dir"),
    case("sample", "--out-dir", "{file}", expect="--out-dir"),
    case("sample", "--out-dir", "", expect="--out-dir"),
    case("sample", "--out-dir", "{adapters}", expect="--out-dir"),
    # params files that are not what they should be; unknown options
    case("generate", "--params", "{binary}", expect="params file"),
    case("train", "--params", "{dir}", expect="params file"),
    case("evaluate", "--params", "{list}", expect="params file"),
    case("base", "--params", "{badyaml}", expect="params file"),
    case("generate", "--params", "{missing}", expect="params file"),
    case("train", "--bogus", "1", expect="--bogus"),
    # stages.sample
    case("sample", "--steps", "-3", expect="--steps"),
    case("sample", "--per-class", "0", expect="--per-class"),
    case("sample", "--batch-size", "0", expect="--batch-size"),
    case("sample", "-w", "nan", expect="guidance_scale"),
    case("sample", "--classes", "one", expect="--classes"),
    case("sample", "--steps", "abc", expect="--steps"),
    case("sample", "--adapters", "", expect="--adapters"),
    case("sample", "--adapters", "{dir}", expect=ADAPTER_CONFIG),
    case("sample", "--prompts-file", "{binary}", expect="is not UTF-8 text"),
    case("sample", "--adapters", "{adapters}", "--classes", "1,99", expect="not classes of the base model"),
    case("sample", "--adapters", "{adapters}", "--steps", "5000", expect="steps"),
    # stages.inspect
    case("inspect", "{store}", "--bins", "0", expect="--bins"),
    case("inspect", "{store}", "--bins", "-3", expect="--bins"),
    case("inspect", "{store}", "--bins", "abc", expect="--bins"),
    case("inspect", "{store}", "--scheduler", "nonsense", expect="--scheduler"),
    case("inspect", "{store}", "--scheduler", "tcp://", expect="--scheduler"),
    case("inspect", "{store}", "--workers", "0", expect="--workers"),
    case("inspect", "{store}", "--json", "{dir}", expect="--json"),
    case("inspect", "{missing}", expect="missing"),
    # stages.convert
    case("convert", "{store}", "{tmp}/converted", "--bitround-keepbits", "11", expect="--bitround-keepbits"),
    case("convert", "{store}", "{store}", expect="target"),
    case("convert", "{store}", "{store}/inside", expect="target"),
    case("convert", "{store}", "{store}/..", expect="target"),
    case("convert", "{store}", "{file}", expect="target"),
    case("convert", "{missing}", "{tmp}/converted", expect="source"),
]


@pytest.fixture
def paths(tmp_path, monkeypatch, request):
    """Placeholders of the argv templates; model folders are built only for the cases that use them."""
    monkeypatch.chdir(tmp_path)  # relative defaults (data/..., params.yaml) resolve in here
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01garbage")
    (tmp_path / "list.yaml").write_text("- generate\n- train\n")
    (tmp_path / "bad.yaml").write_text("base: [1\n")
    values = {"tmp": str(tmp_path), "file": str(tmp_path / "afile"), "dir": str(tmp_path / "adir"),
              "binary": str(tmp_path / "binary.yaml"), "list": str(tmp_path / "list.yaml"),
              "badyaml": str(tmp_path / "bad.yaml"), "missing": str(tmp_path / "no_such_thing")}
    lazy = {"base": lambda: request.getfixturevalue("tiny_base_dir"),
            "store": lambda: request.getfixturevalue("tiny_store"),
            "adapters": lambda: request.getfixturevalue("fresh_adapters")}

    def fill(argv: list[str]) -> list[str]:
        for name, build in lazy.items():
            if any("{" + name + "}" in a for a in argv):
                values[name] = str(build())
        return [a.format(**values) for a in argv]

    return fill


@pytest.fixture(scope="session")
def fresh_adapters(tiny_base_dir, tmp_path_factory) -> Path:
    """An adapter folder as stages.train writes it, from untrained adapters (no training needed)."""
    return write_untrained_adapters(tiny_base_dir, tmp_path_factory.mktemp("fresh_adapters") / "adapters", 4)


def call(main, argv) -> int:
    """A stage's exit status, whether main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def assert_one_error_line(rc, captured, expect: str) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (rc, captured.err)
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert expect in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("stage, argv, expect", CASES)
def test_bad_input_is_one_error_line(stage, argv, expect, paths, capsys, tmp_path):
    argv = paths(argv)
    if stage == "sample" and "--adapters" not in argv:
        argv = ["--adapters", str(tmp_path / "no_adapters"), *argv]
    if stage == "sample" and "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "samples")]
    rc = call(MAIN[stage], argv)
    assert_one_error_line(rc, capsys.readouterr(), expect)
    assert not (tmp_path / "samples").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------- edited adapter_config.json


def drop(*keys):
    def edit(config):
        section = config
        for key in keys[:-1]:
            section = section[key]
        del section[keys[-1]]
    return edit


def put(value, *keys):
    def edit(config):
        section = config
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
    return edit


def forged(edit):
    def forge(config):
        from agd_pipeline.adapters import config_digest

        edit(config)
        config["integrity"]["config"] = config_digest(config)
    return forge


EDITS = {
    "adapter key removed": (drop("adapter", "width"), "'width'"),
    "wrong type": (put("8", "adapter", "width"), "adapter.width"),
    "unknown extra key": (put(1, "adapter", "dropout"), "'dropout'"),
    "placements edited": (lambda c: c["placements"].pop(), "differ from the sha256"),
    "placement changed": (put("block", "adapter", "placement"), "differ from the sha256"),
    "placements edited, digest forged": (forged(lambda c: c["placements"].pop()), "placements"),
    "placement changed, digest forged": (forged(put("block", "adapter", "placement")), "placements"),
    "base_model missing": (drop("base_model"), "base_model"),
    "base_model id not a string": (put(3, "base_model", "id"), "base_model.id"),
    "sampler removed": (drop("sampler"), "sampler"),
    "guidance reversed": (put({"min": 6.0, "max": 1.0}, "guidance"), "guidance"),
    "format_version": (put(99, "format_version"), "format_version"),
    "condition on text of a class model": (put(["guidance", "text"], "adapter", "condition_on"), "text_dim"),
    "kind changed": (put("offset", "adapter", "kind"), "differ from the sha256"),
    "shape changed": (put(5, "adapter", "fourier_frequencies"), "differ from the sha256"),
    "guidance unit changed": (put(2.0, "adapter", "guidance_scale_unit"), "differ from the sha256"),
    # a forger who also recomputes the config's digest: the weights still do not fit the config
    "kind changed, digest forged": (forged(put("offset", "adapter", "kind")), "does not match"),
    "shape changed, digest forged": (forged(put(5, "adapter", "fourier_frequencies")), "does not match"),
    "not an object": (lambda c: c.clear() or c.update({"x": 1}), "format"),
}


# evaluate reads the config through the same functions: three edits suffice there
@pytest.mark.parametrize("name, stage", [(name, "sample") for name in EDITS] + [
    (name, "evaluate") for name in ("adapter key removed", "placements edited, digest forged", "sampler removed")])
def test_edited_adapter_config_is_one_error_line(name, stage, fresh_adapters, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "adapters"
    shutil.copytree(fresh_adapters, folder)
    edit, expect = EDITS[name]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    edit(config)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    if stage == "sample":
        rc = call(stages.sample.main, ["--adapters", str(folder), "--classes", "1", "--per-class", "1", "--steps", "2",
                                 "--device", "cpu", "--out-dir", str(tmp_path / "samples")])
    else:
        rc = call(stages.evaluate.main, ["--adapters", str(folder), "--out-dir", str(tmp_path / "eval"), "--device",
                                   "cpu", "--samples-per-class", "2", "--guidance-scales", "2"])
    line = assert_one_error_line(rc, capsys.readouterr(), expect)
    assert "re-run training" in line


def test_flipped_adapter_weights_are_one_error_line(fresh_adapters, tmp_path, capsys):
    """Two flipped bytes inside a tensor leave a readable safetensors file: only the digest sees them."""
    from agd_pipeline.adapters import ADAPTER_WEIGHTS

    folder = tmp_path / "adapters"
    shutil.copytree(fresh_adapters, folder)
    data = bytearray((folder / ADAPTER_WEIGHTS).read_bytes())
    data[-3] ^= 0x10
    data[-40] ^= 0x01
    (folder / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    rc = call(stages.sample.main, ["--adapters", str(folder), "--classes", "1", "--per-class", "1", "--steps", "2",
                                   "--device", "cpu", "--out-dir", str(tmp_path / "samples")])
    line = assert_one_error_line(rc, capsys.readouterr(), f"{ADAPTER_WEIGHTS}: its bytes differ from the sha256")
    assert "re-run training" in line
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("args, expect", [
    (["--samples-per-class", "1"], "at least 2 for FID statistics per class"),
    (["--negative-check-scale", "-1"], "evaluate.negative_check_scale"),
    (["--prompts-file", "prompts.txt"], "class-conditional"),
    (["--clip-model", "some/clip"], "evaluate.clip_model"),
])
def test_evaluate_refuses_text_options_on_a_class_model(args, expect, fresh_adapters, tmp_path, capsys):
    """The text-model options of evaluate on the class default: one error line, nothing sampled."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    rc = call(stages.evaluate.main, ["--adapters", str(fresh_adapters), "--out-dir", str(tmp_path / "eval"),
                                     "--device", "cpu", "--guidance-scales", "2", "--samples-per-class", "2", *args])
    assert_one_error_line(rc, capsys.readouterr(), expect)
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize("text", [b"", b"\xff\xfe", b"[1, 2]", b"[" * 100_000])
def test_unreadable_adapter_config_is_one_error_line(text, fresh_adapters, tmp_path, capsys):
    folder = tmp_path / "adapters"
    shutil.copytree(fresh_adapters, folder)
    (folder / ADAPTER_CONFIG).write_bytes(text)
    rc = call(stages.sample.main, ["--adapters", str(folder), "--out-dir", str(tmp_path / "samples")])
    assert "re-run training" in assert_one_error_line(rc, capsys.readouterr(), ADAPTER_CONFIG)


def test_device_index_must_exist(monkeypatch):
    """The GPU branch of resolve_device, on a machine that pretends to have one GPU."""
    from agd_pipeline.devices import resolve_device
    from agd_pipeline.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    assert resolve_device("auto") == "cuda"
    with pytest.raises(ConfigError, match=r"train.device: 'cuda:1' does not exist; this machine has 1 CUDA"):
        resolve_device("cuda:1", "train.device")


# ------------------------------------------------------------------------ the CLIs' safety net


@pytest.mark.parametrize("error, expect", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x/file"), "error: /data/x/file: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x"), "error: /data/x: the disk is full"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/b"), "error: /a/b: "),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB"), "error: out of memory"),
])
def test_os_and_memory_errors_become_one_line(error, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def run(config, args):
        raise error

    rc = stage_main(BaseStageConfig, run, ["--out-dir", str(tmp_path / "out")])
    assert assert_one_error_line(rc, capsys.readouterr(), expect).startswith(expect)


@pytest.mark.parametrize("bug", [RuntimeError("shape mismatch in a matmul"), ValueError("a bug"), KeyError("x")])
def test_real_bugs_keep_their_traceback(bug, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(config, args):
        raise bug

    with pytest.raises(type(bug)):
        stage_main(BaseStageConfig, run, ["--out-dir", str(tmp_path / "out")])


@pytest.mark.parametrize("stage, module, function", [("generate", "agd_pipeline.generation", "generate")])
def test_resolved_config_is_written_except_into_a_store(stage, module, function, tmp_path, monkeypatch):
    """generate does not write into the store (its manifest records the settings, and a DVC-tracked
    output must not change on a re-run); train records its resolved config itself, before its first
    step (tests/training/test_training_outputs.py)."""
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.import_module(module), function, lambda config, progress=True: None)
    out = tmp_path / "out"
    rc = importlib.import_module(f"stages.{stage}").main(["--out-dir", str(out), "--no-progress"])
    assert rc == 0
    assert (out / "resolved_config.json").exists() == (stage == "train")
