"""Every command, stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP: one line, the shell's exit status for
the signal (130, 143, 129), no traceback, and no child process left running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_main

# every test here stops a command by a signal and checks what it leaves
pytestmark = pytest.mark.crash

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def terminal_signals() -> None:
    """Signals as a command started from a terminal has them. A test run started in the background
    (nohup, a CI runner's job) inherits SIGINT and SIGHUP ignored, and a command rightly keeps an
    ignored signal ignored; these tests are about the terminal case. For subprocesses (preexec_fn)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def signals_at_their_defaults():
    """The same for the in-process tests: Python's own Ctrl-C handler, SIGHUP at its default."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def stopped_by(signum):
    """A stand-in for a command's work: the signal arrives while it runs (a real one, to this process)."""
    def work(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the command")
    return work


def _stage_main(module):
    return module, f"{module}.run", []


# command -> (module, what to replace with the stand-in, arguments); tmp is filled in per test
COMMANDS = {
    "stages.base": _stage_main("stages.base"),
    "stages.evaluate": _stage_main("stages.evaluate"),
    "stages.finetune": _stage_main("stages.finetune"),
    "stages.generate": _stage_main("stages.generate"),
    "stages.text_base": _stage_main("stages.text_base"),
    "stages.text_data": _stage_main("stages.text_data"),
    "stages.train": _stage_main("stages.train"),
    "stages.convert": ("stages.convert", "agd_pipeline.store.convert_store", ["{tmp}/source", "{tmp}/target"]),
    "stages.inspect": ("stages.inspect", "agd_pipeline.store.TrajectoryStore", ["{tmp}/source"]),
    "stages.sample": ("stages.sample", "agd_pipeline.inference.sample_images", ["--out-dir", "{tmp}/samples",
                                                                                  "--device", "cpu"]),
    "stages.experiments": ("stages.experiments", "stages.experiments.report",
                           ["report", "unseen-w", "--from-results"]),
    "stages.report": ("stages.report", "stages.report.variants_main", ["--variants"]),
    "stages.benchmark": ("stages.benchmark", "stages.benchmark.run", ["parameters"]),
}


def test_every_command_is_listed():
    """A new command must be added to COMMANDS (and so go through agd_pipeline.interrupts): the
    repository's own (stages/*.py with a main), the library's (agd_pipeline/commands/*.py) and the
    embedded defaults' recipes (defaults/commands/*.py), which stages/<name>.py hands over to."""
    own = {p.stem for p in (REPO / "stages").glob("*.py") if "\ndef main(" in p.read_text()}
    library = {p.stem for folder in (REPO / "agd_pipeline" / "commands", REPO / "defaults" / "commands")
               for p in folder.glob("*.py") if "\ndef main(" in p.read_text()}
    library.discard("__main__")  # the `agd` dispatcher, not a command of its own
    assert {f"stages.{name}" for name in own | library} == set(COMMANDS)
    assert all((REPO / "stages" / f"{name}.py").is_file() for name in library), "a command without stages/<name>.py"


@pytest.mark.parametrize("signum", list(STATUS), ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_signal_ends_every_command_with_one_line(command, signum, tmp_path, monkeypatch):
    import importlib

    module, target, args = COMMANDS[command]
    importlib.import_module(module)
    owner, _, name = target.rpartition(".")
    importlib.import_module(owner)
    monkeypatch.setattr(sys.modules[owner], name, stopped_by(signum))
    (tmp_path / "source").mkdir()
    before = {s: signal.getsignal(s) for s in STATUS}
    result = run_main(module, *(a.format(tmp=tmp_path) for a in args))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == STATUS[signum], result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({NAMES[signum]}): "), result.stderr
    assert {s: signal.getsignal(s) for s in STATUS} == before, "the previous signal handlers were not put back"


SLOW_CONVERT = """
import os, time
import agd_pipeline.store


def convert_store(*args, **kwargs):  # the conversion, slowed down: the signal lands inside it
    open(os.environ["AGD_TEST_READY"], "w").close()
    time.sleep(60)


agd_pipeline.store.convert_store = convert_store
"""


@pytest.mark.parametrize("signum", list(STATUS), ids=lambda s: signal.Signals(s).name)
def test_a_signalled_convert_process_ends_with_one_line(signum, tmp_path):
    """A real `python -m stages.convert` (its conversion slowed down by a sitecustomize), signalled while
    it converts: its status, one line, no traceback."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_CONVERT)
    (tmp_path / "source").mkdir()
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)]),
           "AGD_TEST_READY": str(ready), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "stages.convert", str(tmp_path / "source"),
                                str(tmp_path / "target"), "--no-progress"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=terminal_signals)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        line = signal_for_one_line(process, signum)
    finally:
        if process.poll() is None:
            process.kill()
    assert line == f"interrupted ({NAMES[signum]}): re-run the same command to finish converting " \
        f"{tmp_path / 'source'} (it resumes)"


# ------------------------------------------------ real processes (stages.experiments and its dvc: experiments/)


def signal_for_one_line(process: subprocess.Popen, signum: int) -> str:
    """Send ``signum`` to a running command; it must end with the signal's status and one stderr
    line, no traceback. Returns that line."""
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == STATUS[signum], stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", list(STATUS), ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_a_command_starts_is_one_line(signum):
    """`python -m stages.X` handles the signals from the moment the stages package loads, before the
    command's (slow) imports and its main: a signal then is one line and its status too."""
    script = ("import sys; sys.argv[:1] = ['-m']; import stages, os, time; "  # as `python -m stages.X` starts
              f"os.kill(os.getpid(), {int(signum)}); time.sleep(10)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            preexec_fn=terminal_signals)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == STATUS[signum], result.stderr
    assert lines == [f"interrupted ({NAMES[signum]}): re-run the same command"], result.stderr


@pytest.mark.parametrize("under_dvc", [True, False], ids=["under-dvc", "by-hand"])
def test_a_stage_dies_with_a_killed_dvc_but_not_with_a_shell(under_dvc, tmp_path):
    """A SIGKILLed `dvc repro` must not leave its stage running unseen: under DVC (DVC_STAGE set) the
    stage asks for SIGTERM when its parent dies. By hand (`nohup python -m stages.X &`) it outlives
    the shell it was started from."""
    stage = ("import sys; sys.argv[:1] = ['-m']; import stages, time; "  # as `python -m stages.X` starts
             "print('ready', flush=True); time.sleep(60)")
    parent = ("import os, subprocess, sys, time\n"
              f"env = {{**os.environ, 'DVC_STAGE': 'evaluate'}} if {under_dvc} else "
              "{k: v for k, v in os.environ.items() if k != 'DVC_STAGE'}\n"
              f"child = subprocess.Popen([sys.executable, '-c', {stage!r}], env=env, stdout=subprocess.PIPE, "
              "text=True)\n"
              "child.stdout.readline()\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    dvc = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           preexec_fn=terminal_signals)
    try:
        child = int(dvc.stdout.readline())
        assert _alive(child)
        dvc.kill()  # SIGKILL: dvc has no chance to stop its stage itself
        dvc.wait(timeout=30)
        for _ in range(50):
            if not _alive(child):
                break
            time.sleep(0.1)
        assert _alive(child) != under_dvc
    finally:
        if dvc.poll() is None:
            dvc.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(child, signal.SIGKILL)


