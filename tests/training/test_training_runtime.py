"""What changes the adapters' bits besides train's settings is recorded: accelerate's mixed
precision (as accelerate resolved it), torch's TF32 switches and thread counts, in
resolved_config.json, adapter_config.json and the checkpoint. The mixed precision counts as a
setting: one that contradicts train.dtype is refused before any work, and a checkpoint or finished
adapters of another mixed precision are never continued silently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import agd_pipeline.training as training
from agd_pipeline.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from agd_pipeline.errors import AgdError, ConfigError

from conftest import snapshot
from test_training import QUIET, Interrupted, train_config

RUNTIME_KEYS = {"mixed_precision", "cuda_matmul_allow_tf32", "cudnn_allow_tf32", "float32_matmul_precision",
                "num_threads", "num_interop_threads", "num_processes", "distributed_type"}


@pytest.fixture
def mixed_precision(monkeypatch):
    """Set ACCELERATE_MIXED_PRECISION for the next training run. accelerate reads it once per
    process, into a shared state: that state is cleared so the next Accelerator reads it again, and
    cleared after the test, so that later tests get the default."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    def use(precision: str) -> None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
        reset()

    yield use
    reset()


def test_the_runtime_is_recorded_and_mixed_precision_changes_the_adapters(tiny_store, tmp_path, mixed_precision):
    """train.dtype bfloat16 with and without accelerate's bf16 autocast: different adapters (the
    reason to record it), and the records say which is which."""
    records = {}
    for precision in ("no", "bf16"):
        mixed_precision(precision)
        out = tmp_path / precision
        training.train(train_config(tiny_store, out, steps=3, dtype="bfloat16"), **QUIET)
        resolved = json.loads((out / "resolved_config.json").read_text())
        adapter = json.loads((out / ADAPTER_CONFIG).read_text())
        state = json.loads((out / training.CHECKPOINT / "state.json").read_text())
        assert list(resolved) == ["train", "runtime"] and resolved["train"]["dtype"] == "bfloat16"
        for record in (resolved["runtime"], adapter["runtime"], state["runtime"]):
            assert set(record) == RUNTIME_KEYS and record["mixed_precision"] == precision, record
            assert record["cuda_matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
            assert record["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
            assert record["float32_matmul_precision"] == torch.get_float32_matmul_precision()
            assert record["num_threads"] == torch.get_num_threads()
            assert record["num_interop_threads"] == torch.get_num_interop_threads()
            assert (record["num_processes"], record["distributed_type"]) == (1, "NO"), record
        records[precision] = load_file(out / ADAPTER_WEIGHTS)
    assert any(not torch.equal(records["no"][key], records["bf16"][key]) for key in records["no"]), \
        "bf16 autocast gave the same adapters: this test no longer shows why it is recorded"


@pytest.mark.bad_input
@pytest.mark.parametrize("dtype, precision, expect", [
    ("", "bf16", "runs in float32 (the store's dtype, train.dtype being empty)"),
    ("float32", "bf16", "runs in float32 (train.dtype float32)"),
    ("float16", "bf16", "runs in float16 (train.dtype float16)"),
    ("bfloat16", "fp16", "runs in bfloat16 (train.dtype bfloat16)"),
    # accelerate's own refusal (without transformer_engine or torchao), else ours: one line either way
    ("bfloat16", "fp8", "fp8"),
])
def test_a_mixed_precision_that_contradicts_train_dtype_is_refused_before_any_work(tiny_store, tmp_path,
                                                                                  mixed_precision, dtype, precision,
                                                                                  expect):
    mixed_precision(precision)
    out = tmp_path / "adapters"
    with pytest.raises(ConfigError) as err:
        training.train(train_config(tiny_store, out, steps=2, dtype=dtype), **QUIET)
    message = str(err.value)
    assert "\n" not in message and expect in message and "nothing was done" in message, message
    assert "ACCELERATE_MIXED_PRECISION" in message, message
    assert not out.exists()


def test_a_run_is_not_resumed_or_continued_under_another_mixed_precision(tiny_store, tmp_path, monkeypatch,
                                                                          mixed_precision):
    settings = dict(dtype="bfloat16", checkpoint_every=2)
    # a run under bf16 killed right after its checkpoint of step 2
    mixed_precision("bf16")
    killed = tmp_path / "killed"
    original = training._save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(training, "_save_checkpoint", save_then_die)
        with pytest.raises(Interrupted):
            training.train(train_config(tiny_store, killed, steps=6, **settings), **QUIET)
    before = snapshot(killed / training.CHECKPOINT)

    mixed_precision("no")
    with pytest.raises(AgdError) as err:
        training.train(train_config(tiny_store, killed, steps=6, **settings), **QUIET)
    message = str(err.value)
    assert "\n" not in message and "accelerate's mixed precision: bf16 -> no" in message, message
    assert "--restart-on-mismatch true" in message, message
    assert snapshot(killed / training.CHECKPOINT) == before
    messages = []
    training.train(train_config(tiny_store, killed, steps=6, restart_on_mismatch=True, **settings), progress=False,
                   log=messages.append)
    assert any("mixed precision" in m and "starting over" in m for m in messages), messages
    assert json.loads((killed / ADAPTER_CONFIG).read_text())["runtime"]["mixed_precision"] == "no"

    # finished under no: the same command under bf16 is not "nothing to do", nor continued
    finished = tmp_path / "finished"
    shutil.copytree(killed, finished)
    before = snapshot(finished)
    mixed_precision("bf16")
    with pytest.raises(ConfigError, match="accelerate's mixed precision 'no' there, 'bf16' now"):
        training.train(train_config(tiny_store, finished, steps=6, **settings), **QUIET)
    with pytest.raises(ConfigError, match="accelerate's mixed precision 'no' there, 'bf16' now"):
        training.train(train_config(tiny_store, finished, steps=8, **settings), **QUIET)
    assert snapshot(finished) == before


def test_a_resolved_config_with_its_runtime_still_marks_the_folder_as_trains(tmp_path):
    """The runtime sits beside the section; only that one extra key is ours (a record with any other
    is not provably this stage's)."""
    from agd_pipeline.outputs import resolved_section, write_resolved

    config = train_config("store", tmp_path / "out")
    write_resolved(config, tmp_path / "out", runtime={"mixed_precision": "no"})
    assert resolved_section(tmp_path / "out") == "train"
    record = json.loads((tmp_path / "out" / "resolved_config.json").read_text())
    for other in ({**record, "notes": "mine"}, {"runtime": record["runtime"], "train": record["train"]}):
        (tmp_path / "out" / "resolved_config.json").write_text(json.dumps(other))
        assert resolved_section(tmp_path / "out") is None, other


# ------------------------------------------------------------------------------ several processes


class RankAccelerator:
    """accelerate's Accelerator as process ``rank`` of ``world`` sees it (no process group): enough of
    it for train() to decide what to do. A barrier is an error: the test's other ranks are not running."""

    def __init__(self, rank: int, world: int, *args, **kwargs):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.mixed_precision, self.device, self.distributed_type = "no", torch.device("cpu"), "MULTI_CPU"

    def wait_for_everyone(self):
        raise AssertionError(f"rank {self.process_index} waits at a barrier that rank 0 never reaches")


def as_rank(monkeypatch, rank: int, world: int, sent: list) -> None:
    """Make the next train() process ``rank`` of ``world``: rank 0 records what it hands to the others
    into ``sent``, the others receive what it recorded (as broadcast_object_list would)."""
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", lambda *a, **k: RankAccelerator(rank, world))

    def broadcast(objects: list) -> list:
        if rank == 0:
            sent.append(list(objects))
        else:
            objects[:] = sent[-1]
        return objects

    monkeypatch.setattr(training, "_broadcast", broadcast, raising=False)


def test_every_rank_of_a_finished_run_has_nothing_to_do(tiny_store, tmp_path, monkeypatch):
    """Run again on finished adapters under two processes: rank 0 finds nothing to do and every other
    rank returns its result too, instead of going on to train and waiting for rank 0 at a barrier."""
    out = tmp_path / "out"
    config = train_config(tiny_store, out, steps=3)
    training.train(config, **QUIET)
    before = snapshot(out)
    sent = []
    as_rank(monkeypatch, 0, 2, sent)
    first = training.train(config, **QUIET)
    assert first["skipped"] is True and len(sent) == 1
    as_rank(monkeypatch, 1, 2, sent)
    assert training.train(config, **QUIET) == first
    assert snapshot(out) == before


def test_every_rank_stops_when_rank_0_refuses(tiny_store, tmp_path, monkeypatch):
    """Rank 0 refuses finished adapters of other settings: the other ranks stop with an error that
    points at rank 0's, rather than wait for it at a barrier."""
    out = tmp_path / "out"
    training.train(train_config(tiny_store, out, steps=3), **QUIET)
    changed = train_config(tiny_store, out, steps=3, learning_rate=0.5)
    sent = []
    as_rank(monkeypatch, 0, 2, sent)
    with pytest.raises(ConfigError, match="holds finished adapters"):
        training.train(changed, **QUIET)
    as_rank(monkeypatch, 1, 2, sent)
    with pytest.raises(AgdError, match="rank 0 stopped") as err:
        training.train(changed, **QUIET)
    assert "\n" not in str(err.value)


def test_the_runtime_records_how_many_processes_trained():
    """Two processes average their gradients (a different sum order than one process's batch): the
    record says how many trained, and how accelerate connected them."""
    record = training.runtime_record(RankAccelerator(0, 2))
    assert (record["num_processes"], record["distributed_type"]) == (2, "MULTI_CPU"), record
    from accelerate.utils import DistributedType

    multi_gpu = RankAccelerator(1, 8)
    multi_gpu.distributed_type = DistributedType.MULTI_GPU
    assert training.runtime_record(multi_gpu)["distributed_type"] == "MULTI_GPU"
