"""stages.experiments stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP while it waits for dvc: one line, the
signal's exit status, and no dvc left running (dvc's process group is stopped with it, also when the
signal lands as the child starts, and dvc gets SIGINT even when the command was started with it
ignored)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_interrupts import NAMES, _alive, signal_for_one_line, terminal_signals

# every test here stops the command by a signal and checks what it leaves
pytestmark = pytest.mark.crash


def fake_dvc(folder: Path, slow: str) -> tuple[dict, Path]:
    """A `dvc` that answers `exp list` and `exp show --json` with nothing, and for ``slow`` (a first
    argument, or "exp list") writes its pid and sleeps: the environment to run a command with, and
    the pid file."""
    pid_file = folder / "dvc.pid"
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dvc"
    script.write_text(f"""#!/bin/sh
case "$*" in
  "{slow}"*) echo $$ > {pid_file}; exec sleep 60 ;;
  "exp show"*) echo '[]' ;;
esac
""")
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    return env, pid_file


@pytest.mark.parametrize("action,slow,signum", [
    ("report", "exp list", signal.SIGINT),
    ("report", "exp list", signal.SIGTERM),
    ("report", "exp list", signal.SIGHUP),
    ("run", "repro", signal.SIGHUP),
    ("run", "repro", signal.SIGTERM),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else v.replace(" ", "-"))
def test_a_signalled_experiments_command_leaves_no_dvc_behind(action, slow, signum, tmp_path):
    """`python -m stages.experiments report|run` waiting for dvc (its own process group): the signal
    ends the command with one line and its status, and the dvc it waited for is stopped with it."""
    env, pid_file = fake_dvc(tmp_path, slow)
    extra = ["--jobs", "1", "--readme", str(tmp_path / "README.md")] if action == "run" else \
        ["--readme", str(tmp_path / "README.md")]
    # size-and-placement: its variants change train, so `run` first brings stage one up to date (dvc repro)
    process = subprocess.Popen([sys.executable, "-m", "stages.experiments", action, "size-and-placement", *extra],
                               cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=terminal_signals)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert _alive(child)
        line = signal_for_one_line(process, signum)
    finally:
        if process.poll() is None:
            process.kill()
    assert line.startswith(f"interrupted ({NAMES[signum]}): "), line
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), f"dvc ({slow}) outlived the command"


def test_dvc_gets_sigint_even_when_the_command_was_started_with_it_ignored(tmp_path):
    """A command started in the background (`nohup ... &`, a CI runner) inherits SIGINT ignored; the
    dvc it runs must still get the SIGINT it is stopped with (graceful), not wait out the grace
    period for SIGKILL."""
    marker, pid_file = tmp_path / "dvc.got-sigint", tmp_path / "dvc.pid"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(f"#!/bin/sh\ntrap 'echo INT > {marker}; exit 130' INT\n"
                                 f"echo $$ > {pid_file}\nsleep 60 &\nwait\n")
    (bin_dir / "dvc").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "stages.experiments", "report", "unseen-w", "--readme",
                                str(tmp_path / "README.md")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        signal_for_one_line(process, signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    assert marker.read_text().strip() == "INT"


def test_a_signal_right_after_the_child_starts_still_stops_its_group(tmp_path):
    """A stop signal that lands the moment Popen has returned, before the command waits on its child
    (on a loaded machine the test runs below met it), still stops the child's group: the signals are
    held from before the child starts until that wait. Without that the command waited for its child
    (here a 10-minute sleep)."""
    pid_file = tmp_path / "child.pid"
    script = f"""
import os, signal, subprocess, sys
from experiments import driver as experiments
from agd_pipeline.interrupts import Interrupted, signals_as_interrupts

real = subprocess.Popen
def popen(*args, **kwargs):
    process = real(*args, **kwargs)
    open({str(pid_file)!r}, "w").write(str(process.pid))
    os.kill(os.getpid(), signal.SIGTERM)  # at once, before run_in_group's wait
    return process
subprocess.Popen = popen
try:
    with signals_as_interrupts():
        experiments.run_in_group(["sleep", "600"])
except Interrupted:
    sys.exit(143)
sys.exit(0)
"""
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                                timeout=120, preexec_fn=terminal_signals)
    except subprocess.TimeoutExpired:  # it waited for the 10-minute child instead of stopping it
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        raise
    assert result.returncode == 143, result.stderr
    child = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the child outlived the command"
