"""Stage two's checkpoints: bound to their store, never unpickled from an output folder, resumed from the
new one after a kill while swapping, and a damaged checkpoint or a full disk at one is a one-line
error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import agd_pipeline.training as training
from agd_pipeline.errors import AgdError
from agd_pipeline.locks import LOCK_FILE
from agd_pipeline.store import TrajectoryStore

from conftest import QUIET, generate_store
from test_training import interrupted_training, kept_checkpoint, train_config


@pytest.mark.bad_input
def test_a_checkpoint_of_another_store_is_never_resumed(tiny_base_dir, tmp_path, monkeypatch):
    store, out = tmp_path / "store", tmp_path / "adapters"
    generate_store(tiny_base_dir, store)
    interrupted_training(store, out, monkeypatch)
    # the README's DVC flow: the store is replaced in place, train runs again
    generate_store(tiny_base_dir, store, seed=3, restart_on_mismatch=True)
    with pytest.raises(AgdError, match="trained on another store"):
        training.train(train_config(store, out, steps=6, checkpoint_every=2), **QUIET)
    messages = []
    training.train(train_config(store, out, steps=6, checkpoint_every=2, restart_on_mismatch=True),
                   progress=False, log=messages.append)
    assert any("trained on another store" in m and "starting over" in m for m in messages), messages
    assert not any("resuming from" in m for m in messages), messages
    recorded = json.loads((out / "adapter_config.json").read_text())["store"]
    assert recorded["fingerprint"] == TrajectoryStore(store).fingerprint()


CRAFTED_PICKLE = textwrap.dedent("""
    import os, pickle, sys
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[1],))
    for name in sys.argv[2:]:
        with open(name, "wb") as f:
            pickle.dump(Payload(), f)
""")


@pytest.mark.bad_input
@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_a_crafted_pickle_in_a_checkpoint_folder_is_never_executed(tiny_store, tmp_path, monkeypatch, layout):
    out = tmp_path / "adapters"
    marker = tmp_path / "pwned"
    checkpoint = out / training.CHECKPOINT
    if layout == "current":
        interrupted_training(tiny_store, out, monkeypatch)
        names = ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]
    else:  # an accelerate checkpoint, as earlier releases wrote them
        checkpoint.mkdir(parents=True)
        (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "config": {}}))
        names = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]
    subprocess.run([sys.executable, "-c", CRAFTED_PICKLE, str(marker), *(str(checkpoint / n) for n in names)],
                   check=True)
    assert not marker.exists()
    try:
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)
    except AgdError as err:  # the legacy checkpoint is refused, never loaded
        assert layout == "legacy" and "earlier release" in str(err)
    assert not marker.exists(), "a pickle from the output folder was executed"


@pytest.mark.crash
def test_a_run_killed_while_swapping_checkpoints_resumes_from_the_new_one(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    interrupted_training(tiny_store, out, monkeypatch)
    checkpoint = out / training.CHECKPOINT
    checkpoint.rename(checkpoint.with_name("checkpoint.tmp"))  # the old one removed, the new one not yet renamed
    messages = []
    training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), progress=False, log=messages.append)
    assert any(f"resuming from {checkpoint} at step 2" in m for m in messages), messages
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == \
        ["README.md", "adapter_config.json", "adapters.safetensors", "checkpoint", "loss.csv", "resolved_config.json"]
    assert kept_checkpoint(out) == 6 and not checkpoint.with_name("checkpoint.tmp").exists()


@pytest.mark.bad_input
def test_a_damaged_checkpoint_is_a_one_line_error(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    interrupted_training(tiny_store, out, monkeypatch)
    (out / training.CHECKPOINT / "optimizer.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AgdError, match="checkpoint is damaged"):
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)


@pytest.mark.crash
def test_a_full_disk_at_the_checkpoint_stops_with_a_message(tiny_store, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "adapters"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "save_file", full_disk)
    with pytest.raises(AgdError, match="cannot write the training checkpoint at step 2 .the disk is full"):
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)
    assert not (out / "checkpoint.tmp").exists()
