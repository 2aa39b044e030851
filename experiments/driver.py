"""Running an experiment: each variant one ``dvc exp run`` with ``--set-param`` overrides, queued and run
``--jobs`` at a time in DVC's temporary copies of the repository (sharing its cache), after a ``dvc
repro`` in the workspace of the stages no variant changes; then each run's summary metrics from ``dvc
exp show --json``. Ctrl-C, SIGTERM and SIGHUP stop the running command's process group and the
queue's workers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from agd_pipeline.errors import AgdError
from agd_pipeline.interrupts import signals_as_interrupts

from .catalog import Experiment
from .tables import _cell, _keys

def _param_value(value) -> str:
    """A -S value DVC parses back to the same YAML value (strings quoted, lists as YAML)."""
    return json.dumps(value)


def run_commands(experiment: Experiment, queue: bool = False) -> list[list[str]]:
    """The ``dvc exp run`` command of each variant, in order: run at once in a temporary copy
    (``--temp``), or put in DVC's queue (``--queue``) for :func:`run` to run several at a time."""
    commands = []
    for name, params in experiment.runs().items():
        sets = [arg for key, value in params.items() for arg in ("-S", f"{key}={_param_value(value)}")]
        commands.append(["dvc", "exp", "run", "--queue" if queue else "--temp", "-n", name, *sets,
                         experiment.pipeline])
    return commands


# The sections of a pipeline's params file are read by the stages of the same name, in this order
# (dvc.yaml: generate -> train -> evaluate from the shipped base; pipelines/text/dvc.yaml the same per
# family). The bases' recipes are a pipeline of their own (pipelines/bases/dvc.yaml) no variant runs.
STAGE_ORDER = ("generate", "train", "evaluate")


def prepare_command(experiment: Experiment) -> list[str] | None:
    """``dvc repro`` in the workspace, before the variants: of the stages no variant's params reach
    (those before the first stage whose section a variant sets), or, where that cannot be told, of
    the whole pipeline; None where the variants change the first stage (nothing is shared but the
    shipped base).

    A variant's copy starts from the workspace's dvc.lock and restores a stage's outputs from the
    shared cache only under the hashes that lock names (DVC's run cache is not consulted for a stage
    whose lock entry matches). In a fresh clone the cache is empty, so without this step every
    variant would train the base model again; with it, the shared stages run once (or are found up
    to date in seconds) and each variant re-runs only the stages its params reach, several variants
    at a time. The default's own row is then one of the variants, run like the others.
    """
    if experiment.prepare:
        return ["dvc", "repro", experiment.prepare]
    file, colon, target = experiment.pipeline.rpartition(":")
    file = file if colon else experiment.pipeline
    sections = {key.rpartition(":")[2].split(".")[0] for variant in experiment.variants for key in variant.params}
    if not sections or not sections <= set(STAGE_ORDER):
        return ["dvc", "repro", experiment.pipeline]
    if min(map(STAGE_ORDER.index, sections)) == 0:
        return None
    stage = STAGE_ORDER[min(map(STAGE_ORDER.index, sections)) - 1]
    item = target.partition("@")[2] if colon else ""
    return ["dvc", "repro", f"{file}:{stage}" + (f"@{item}" if item else "")]


POLL_SECONDS = 15
POLL_COST_FACTOR = 9  # the wait between polls is at least this many times the last poll's time


# Inside: SIGTERM and SIGHUP raise agd_pipeline.cli.Interrupted (a KeyboardInterrupt), so the same clean-up
# runs as for Ctrl-C: the running command's process group is stopped (:func:`run_in_group`) and the
# queue's workers, which are not this process's children, too. Every stage's main runs inside it.
terminate_as_interrupt = signals_as_interrupts


GRACE_SECONDS = 20  # an interrupted command's group gets SIGINT, then SIGKILL after this long


def run_in_group(command: list[str], capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the command in a process group of its own. Interrupted (Ctrl-C, or SIGTERM
    inside :func:`terminate_as_interrupt`), the whole group gets SIGINT, as a terminal gives it, and
    SIGKILL after GRACE_SECONDS (a background job ignores SIGINT) or at a second interrupt: `dvc repro`
    and the stage it runs stop together, where ``subprocess.run`` would SIGKILL dvc alone and leave its
    stage running unseen."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The stop signals wait (blocked) from before the child exists until the `try` that stops its group
    # is entered: a signal that lands between Popen's return and the `try` would otherwise leave the
    # child running (Popen's own exit waits for it), which a loaded machine made happen in the tests.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        process = subprocess.Popen(command, start_new_session=True, preexec_fn=_interruptible_child, **kwargs)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    with process:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal pending since Popen is handled here
            stdout, stderr = process.communicate()
        except BaseException:
            _stop_group(process)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interruptible_child() -> None:
    """In the child, before it runs the command: SIGINT back to its default, and the stop signals
    unblocked (the parent blocks them while it starts the child). A process started in the
    background (``nohup ... &``, CI runners) inherits SIGINT ignored, and its children would then
    ignore the SIGINT that :func:`_stop_group` sends and last the whole grace period."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: wait no longer
        process.wait(GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):  # what is left of the group: the stage under a dead dvc, say
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run(experiment: Experiment, log=print, runner=run_in_group, jobs: int = 1, sleep=None) -> None:
    """Run the shared stages in the workspace (:func:`prepare_command`), then every variant as a DVC
    experiment, replacing earlier runs of the same name: one after the other in temporary copies
    (``jobs`` 1), or queued and run ``jobs`` at a time by DVC's queue workers (each stage runs one
    torch thread, so one job per core uses the machine)."""
    sleep = sleep or time.sleep
    names = list(experiment.runs())
    existing = set(_experiment_rows(show_json(runner, names)))
    stale = [name for name in names if name in existing]
    if stale:
        log(f"replacing earlier runs: {', '.join(stale)}")
        _check(runner(["dvc", "exp", "remove", *stale], capture_output=True, text=True), "dvc exp remove")
    jobs = max(1, min(jobs, len(names)))
    if jobs > 1:  # failed or unstarted queue entries of these names, from an earlier try (none: DVC says so)
        runner(["dvc", "queue", "remove", *names], capture_output=True, text=True)
    commands = [prepare_command(experiment), *run_commands(experiment, queue=jobs > 1)]
    for command in filter(None, commands):
        log("$ " + shlex.join(command))
        result = runner(command, text=True)
        if result.returncode != 0:
            raise AgdError(f"{shlex.join(command)} failed (exit {result.returncode}); its output is above. "
                           "Fix the cause and run the same command again: finished variants are replaced.")
    if jobs == 1:
        return
    start = ["dvc", "queue", "start", "--jobs", str(jobs)]
    log("$ " + " ".join(start))
    # the workers it starts inherit its output: to a pipe, reading it would wait for them to finish
    with tempfile.TemporaryFile("w+") as errors:
        started = runner(start, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        if started.returncode != 0:
            errors.seek(0)
            raise AgdError(f"dvc queue start failed (exit {started.returncode}): {errors.read().strip()[-2000:]}")
    def restart() -> None:  # quiet when every worker is up (busy with other runs in the queue, say)
        with tempfile.TemporaryFile("w+") as output:
            runner(start, stdout=output, stderr=subprocess.STDOUT, text=True)
            output.seek(0)
            said = re.search(r"Started '(\d+)'", output.read())
        if said is None or int(said.group(1)) > 0:
            log("$ " + " ".join(start) + "   (runs left queued with a worker missing: started again)")

    try:
        _wait_for_queue(names, runner, log, sleep, restart, jobs)
    except KeyboardInterrupt:  # the queue's workers are not this process's children: stop them too
        runner(["dvc", "queue", "kill", *names], capture_output=True, text=True)
        runner(["dvc", "queue", "stop"], capture_output=True, text=True)
        raise
    except AgdError:  # a failed run: the others finish, nothing new starts
        runner(["dvc", "queue", "stop"], capture_output=True, text=True)
        raise
    # finished: the workers leave by themselves once the queue is empty (no `dvc queue stop` needed)


SHOW_RETRIES = 8  # consecutive failed `dvc exp show` calls while waiting before giving up (2 minutes)


def _wait_for_queue(names: list[str], runner, log, sleep, restart=None, jobs: int = 1) -> None:
    """Until every named run has left DVC's queue; a failed run stops it with its log's path. A
    ``dvc exp show`` that fails while the queue's workers set up or clear their temporary copies
    (DVC reads a copy's folder as it is removed: "directory '.dvc/tmp/exps/tmp.../.dvc' does not
    exist") is asked again at the next poll; only SHOW_RETRIES failures in a row stop the wait.
    When runs are left queued and fewer than ``jobs`` of them run for two polls in a row, a worker has
    gone: ``restart`` starts the missing ones again (``dvc queue start`` skips the workers that are
    up). Seen here twice: a worker logged "Got shutdown from remote" a few milliseconds after it
    took its first task, ran that task to its end and left; once both did (two runs left queued with
    no worker), once one did (the other ran the rest one at a time). DVC's trackers know workers that
    stop early with runs still queued (treeverse/dvc#10562, treeverse/dvc-task#77); a scratch
    repository did not reproduce it."""
    waiting, failures, short = None, 0, 0
    while True:
        asked = time.monotonic()
        try:
            shown = show_json(runner, names)
        except AgdError as err:
            failures += 1
            if failures >= SHOW_RETRIES:
                raise AgdError(f"{err} ({failures} times in a row while waiting for the queue; the runs go "
                               "on: `dvc queue status`, then `python -m stages.experiments report NAME`)") from None
            log(f"dvc exp show failed, asking again in {POLL_SECONDS} s: {str(err)[-300:]}")
            sleep(POLL_SECONDS)
            continue
        failures = 0
        states = _run_states(shown, names)
        failed = [name for name in names if states.get(name, {}).get("state") == "failed"]
        if failed:
            logs = ", ".join(f"{name}: {states[name].get('log') or 'dvc queue logs ' + name}" for name in failed)
            raise AgdError(f"experiment runs failed ({logs}). Fix the cause and run the same command again: "
                           "finished variants are replaced.")
        left = [name for name in names if states.get(name, {}).get("state") not in ("success", "done")]
        if not left:
            return
        running = sum(states.get(name, {}).get("state") == "running" for name in names)
        short = short + 1 if running < min(jobs, len(left)) else 0
        if short >= 2 and restart is not None:
            restart()
            short = 0
        if left != waiting:
            log(f"waiting for {len(left)} of {len(names)} runs: {', '.join(left)} (dvc queue status; "
                "dvc queue logs NAME)")
            waiting = left
        # `dvc exp show` of a busy queue takes tens of seconds of a core the runs need: poll at most
        # about a tenth of the time (measured here: 20 s a call with two runs on 2 cores)
        sleep(max(POLL_SECONDS, POLL_COST_FACTOR * (time.monotonic() - asked)))


def _run_states(shown, names: list[str]) -> dict[str, dict]:
    """{run name: {"state": queued / running / success / failed, "log": path}} of the named runs in
    ``dvc exp show --json``, as DVC's queue reports them. A killed ``--temp`` run of the same name
    (listed as running for ever, executor "tempdir") is not the queue's and is passed over."""
    states: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            name, executor = node.get("name"), node.get("executor")
            leftover = isinstance(executor, dict) and executor.get("name") == "tempdir"
            if name in names and name not in states and not leftover and (node.get("revs") or node.get("data")):
                if isinstance(executor, dict):
                    local = executor.get("local") or {}
                    states[name] = {"state": executor.get("state"), "log": local.get("log")}
                elif node.get("rev") != "workspace":
                    states[name] = {"state": "done"}
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(shown)
    return states


def show_json(runner=run_in_group, names: list[str] | None = None, tries: int = 1, sleep=None) -> list:
    """``dvc exp show --json`` of the commits the experiments ``names`` were run on (plain ``dvc exp
    show`` lists only those of HEAD, which moves when results are committed during or after a run),
    and of HEAD. With ``tries`` above 1 a failing ``dvc exp show`` is asked again POLL_SECONDS later
    (it fails now and then while a queue worker sets up or clears its temporary copy)."""
    revs = _baselines(runner, names) if names else []
    command = ["dvc", "exp", "show", "--json", *(arg for rev in revs for arg in ("--rev", rev))]
    for attempt in range(1, tries + 1):
        result = runner(command, capture_output=True, text=True)
        if result.returncode == 0 or attempt == tries:
            break
        (sleep or time.sleep)(POLL_SECONDS)
    _check(result, "dvc exp show")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise AgdError(f"dvc exp show --json printed something that is not JSON ({err})") from None


def _baselines(runner, names: list[str]) -> list[str]:
    """The commits (from ``dvc exp list --all-commits``) that hold an experiment of one of ``names``,
    then HEAD."""
    result = _check(runner(["dvc", "exp", "list", "--all-commits"], capture_output=True, text=True),
                    "dvc exp list")
    found, baseline = [], None
    for line in (result.stdout or "").splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            baseline = line.strip()[:-1]
        elif baseline and any(line.strip().endswith(f"[{name}]") for name in names) and baseline not in found:
            found.append(baseline)
    return [*found, "HEAD"]


def _check(result, what: str):
    if result.returncode != 0:
        raise AgdError(f"{what} failed (exit {result.returncode}): {(result.stderr or '').strip()[-2000:]}")
    return result


def _experiment_rows(shown) -> dict[str, dict]:
    """{experiment name: its "data" (params, metrics)} for every finished named experiment in
    ``dvc exp show --json``. A run that is queued, running or failed, or was killed (DVC keeps listing
    a killed temporary run as "running", beside a later finished run of the same name, and cannot
    remove it), carries an ``executor`` that is not in the state "success", and is skipped."""
    found = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            executor = node.get("executor")
            if executor and not (isinstance(executor, dict) and executor.get("state") == "success"):
                return  # queued, running, failed or killed (a queue's finished run keeps its executor)
            name, data = node.get("name"), node.get("data")
            if isinstance(name, str) and isinstance(data, dict) and node.get("rev") != "workspace":
                found.setdefault(name, data)
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(shown)
    return found


def _summary(data: dict, path: str) -> dict | None:
    for shown, entry in (data.get("metrics") or {}).items():
        if Path(shown).as_posix() == path:
            return (entry or {}).get("data")
    return None


def collect(experiment: Experiment, shown) -> list[dict]:
    """One row per variant: its run name, label and summary metrics. Refuses a missing run."""
    rows_by_name = _experiment_rows(shown)
    rows = []
    for variant in experiment.variants:
        name = experiment.run_name(variant)
        data = rows_by_name.get(name)
        summary = _summary(data, variant.summary) if data else None
        if not summary:
            raise AgdError(f"no finished DVC experiment {name!r} with {variant.summary}; run "
                           f"`python -m stages.experiments run {experiment.name}` first")
        values = {key: summary.get(key) for key in _keys(experiment)}
        bad = {key: value for key, value in values.items() if isinstance(value, float) and not math.isfinite(value)}
        if bad:  # never into results.csv and the README table
            listed = ", ".join(f"{key} = {value}" for key, value in bad.items())
            raise AgdError(f"DVC experiment {name!r}: {variant.summary} holds {listed}, not a finite number; look "
                           "into that run (`dvc exp show`), fix the cause and run it again")
        rows.append({"variant": variant.name, "label": variant.label, "run": name, **values})
    return rows


def overview(experiment: Experiment, shown) -> list[dict]:
    """One row per variant for ``stages.experiments show``: its label, its run's state (finished,
    queued, running, failed, or not run) and, once finished, the table's cells (empty before)."""
    names = [experiment.run_name(v) for v in experiment.variants]
    finished, states = _experiment_rows(shown), _run_states(shown, names)
    keys = _keys(experiment)
    rows = []
    for variant in experiment.variants:
        name = experiment.run_name(variant)
        summary = _summary(finished[name], variant.summary) if name in finished else None
        state = "finished" if summary else (states.get(name) or {}).get("state") or "not run"
        values = {key: summary.get(key) for key in keys} if summary else None
        cells = [_cell(values, column) if values else "" for column in experiment.columns]
        rows.append({"label": variant.label, "run": name, "state": state, "cells": cells})
    return rows
