"""stages.experiments: the variants as `dvc exp run` commands, and the table and plot from
`dvc exp show --json` (DVC's own output format, as dvc 3 prints it)."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from agd_pipeline.errors import AgdError, ConfigError
from experiments import (EXPERIMENTS, collect, get_experiment, markdown_table, prepare_command,
                                      read_results, readme_block, run, run_commands, write_results)

from conftest import REPO, run_cli


def fake_show(summaries: dict[str, dict]) -> list:
    """`dvc exp show --json` with one baseline commit and a named experiment per entry."""
    def data(summary):
        return {"rev": "x", "params": {"params.yaml": {"data": {}}},
                "metrics": {"data/eval/summary.json": {"data": summary},
                            "data/text/sd/eval/summary.json": {"data": {"gap_closed": -1.0}}}}
    return [
        {"rev": "workspace", "name": None, "data": data({"gap_closed": 0.0}), "error": None, "experiments": None},
        {"rev": "abc", "name": "main", "data": data({"gap_closed": 0.0}), "error": None,
         "experiments": [{"revs": [{"rev": f"r{i}", "name": name, "data": data(summary), "error": None,
                                    "experiments": None}], "executor": None, "name": name}
                         for i, (name, summary) in enumerate(summaries.items())]},
    ]


def _tracked_params(pipeline: str) -> dict[str, set[str]]:
    """{params file: keys its stages track} for a dvc.yaml (foreach stages' ``do`` included)."""
    tracked: dict[str, set[str]] = {}
    for stage in yaml.safe_load((REPO / pipeline).read_text())["stages"].values():
        for entry in stage.get("do", stage).get("params", []):
            if isinstance(entry, str):
                tracked.setdefault("params.yaml", set()).add(entry)
            else:
                for path, keys in entry.items():
                    tracked.setdefault(path, set()).update(keys)
    return tracked


def test_every_variant_sets_params_the_pipeline_tracks():
    for experiment in EXPERIMENTS.values():
        tracked = _tracked_params(experiment.pipeline.split(":")[0])
        for variant in experiment.variants:
            for key in variant.params:
                path, _, dotted = key.rpartition(":")
                path = path or "params.yaml"
                params = yaml.safe_load((REPO / path.replace("${item}", "sd3")).read_text())
                section, name = dotted.split(".")
                assert name in params[section], key  # -S would otherwise add a key nothing reads
                # and DVC would not re-run the stage that reads it
                assert dotted in tracked.get(path, set()) | tracked.get(
                    "pipelines/text/${item}.yaml", set()), key


def test_run_commands_are_temp_dvc_experiments_with_quoted_params():
    experiment = get_experiment("trajectories-vs-forward-noised")
    commands = run_commands(experiment)
    assert commands[1] == ["dvc", "exp", "run", "--temp", "-n", "trajectories-vs-forward-noised-forward-noised",
                           "-S", 'generate.source="forward_noised"', "-S",
                           'generate.real_data="pretrained/toy-dit/train.npz"', "-S", 'evaluate.split="validation"',
                           "dvc.yaml"]
    assert 'generate.real_data=""' in commands[0]
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        get_experiment("nope")


def test_run_replaces_earlier_runs_and_stops_on_a_failure():
    experiment = get_experiment("trajectories-vs-forward-noised")
    calls = []

    def runner(command, **kwargs):
        calls.append(command)
        if command[:3] == ["dvc", "exp", "show"]:
            out = json.dumps(fake_show({"trajectories-vs-forward-noised-trajectories": {"gap_closed": 0.5}}))
            return subprocess.CompletedProcess(command, 0, out, "")
        failing = command[:3] == ["dvc", "exp", "run"] and command[5].endswith("-noised-forward-noised")
        return subprocess.CompletedProcess(command, 1 if failing else 0, "", "")

    with pytest.raises(AgdError, match="failed.*run the same command again"):
        run(experiment, log=lambda *a: None, runner=runner)
    calls = [c for c in calls if c[:3] not in (["dvc", "exp", "list"], ["dvc", "exp", "show"])]
    assert calls[0] == ["dvc", "exp", "remove", "trajectories-vs-forward-noised-trajectories"]
    # the variants change stage one, so nothing runs in the workspace first (they share the shipped base)
    assert [c[5] for c in calls[1:]] == [experiment.run_name(v) for v in experiment.variants]
    assert all(c[3] == "--temp" for c in calls[1:])  # jobs 1: one after the other


def test_runs_are_found_on_the_commits_they_were_run_on():
    """`dvc exp show` lists HEAD's experiments only; results committed after a run move HEAD, so the
    runs are looked up on every commit `dvc exp list --all-commits` names for them."""
    from experiments import show_json

    listing = "abc1234:\n\t5a0be05 [other-run]\n1234567:\n\tfc3b00e [mine-a]\n\t0000000 [mine-b]\n"
    calls = []

    def runner(command, **kwargs):
        calls.append(command)
        out = listing if command[:3] == ["dvc", "exp", "list"] else "[]"
        return subprocess.CompletedProcess(command, 0, out, "")

    assert show_json(runner, ["mine-a", "mine-b"]) == []
    assert calls[-1] == ["dvc", "exp", "show", "--json", "--rev", "1234567", "--rev", "HEAD"]
    show_json(runner, ["absent"])
    assert calls[-1] == ["dvc", "exp", "show", "--json", "--rev", "HEAD"]


def test_show_json_asks_again_while_a_worker_races_it():
    """`report` reads `dvc exp show` while queue workers may be setting up a copy (seen on 2026-12-07:
    "directory '.dvc/tmp/exps/tmp5lm7rur0/.dvc' does not exist"); with tries it asks again."""
    from experiments.driver import POLL_SECONDS, show_json

    def flaky(failures: int):
        state = {"shows": 0}

        def runner(command, **kwargs):
            if command[:3] == ["dvc", "exp", "show"]:
                state["shows"] += 1
                if state["shows"] <= failures:
                    return subprocess.CompletedProcess(command, 1, "", "ERROR: directory '.dvc/tmp/exps/x/.dvc' "
                                                                       "does not exist")
                return subprocess.CompletedProcess(command, 0, "[]", "")
            return subprocess.CompletedProcess(command, 0, "", "")
        return runner

    slept = []
    assert show_json(flaky(2), ["a"], tries=3, sleep=slept.append) == [] and slept == [POLL_SECONDS] * 2
    with pytest.raises(AgdError, match="dvc exp show failed.*does not exist"):
        show_json(flaky(3), ["a"], tries=3, sleep=slept.append)
    with pytest.raises(AgdError, match="dvc exp show failed"):  # one try: as before
        show_json(flaky(1), ["a"])


def test_prepare_runs_the_stages_before_the_first_one_a_variant_changes():
    prepared = {name: (prepare_command(experiment) or [None])[-1] for name, experiment in EXPERIMENTS.items()}
    assert prepared["trajectories-vs-forward-noised"] is None  # variants set generate.*: the base is shipped
    assert prepared["size-and-placement"] == "dvc.yaml:generate"  # train.*
    assert prepared["fewer-steps"] == "dvc.yaml:train"  # evaluate.* only
    assert prepared["trajectories-vs-forward-noised-sd3"] is None
    assert prepared["size-and-placement-sd3"] == "pipelines/text/dvc.yaml:generate@sd3"
    assert prepared["fewer-steps-sd3"] == "pipelines/text/dvc.yaml:train@sd3"
    # variants without params (one run of a whole pipeline): all of it, as before
    assert prepared["fine-tuned-derivatives"] == "pipelines/derivatives/dvc.yaml"
    # an experiment that names it: the SD3 default, which both derivative runs start from
    assert prepared["fine-tuned-derivatives-sd3"] == "pipelines/text/dvc.yaml:evaluate@sd3"


def _queue_runner(experiment, states_after: list[dict], calls: list):
    """A fake `dvc` for queued runs: each `dvc exp show` reports the next entry of ``states_after``
    ({run name: executor state}); the first show (before anything is queued) lists no runs."""
    shows = iter([{}, *states_after])

    def runner(command, **kwargs):
        calls.append(command)
        if command[:3] == ["dvc", "exp", "show"]:
            states = next(shows)
            shown = fake_show({name: {"gap_closed": 0.5} for name in states})
            for entry in shown[1]["experiments"]:
                entry["executor"] = {"state": states[entry["name"]], "name": "dvc-task",
                                     "local": {"log": f"/logs/{entry['name']}.out"}}
            return subprocess.CompletedProcess(command, 0, json.dumps(shown), "")
        return subprocess.CompletedProcess(command, 0, "", "")

    return runner


def test_queued_runs_run_jobs_at_a_time_and_are_waited_for():
    experiment = get_experiment("trajectories-vs-forward-noised-sd3")
    names = [experiment.run_name(v) for v in experiment.variants]
    calls, slept = [], []
    states = [{names[0]: "running", names[1]: "queued"}, {names[0]: "success", names[1]: "running"},
              {names[0]: "success", names[1]: "success"}]
    run(experiment, log=lambda *a: None, runner=_queue_runner(experiment, states, calls), jobs=2, sleep=slept.append)
    commands = [c for c in calls if c[:3] not in (["dvc", "exp", "show"], ["dvc", "exp", "list"])]
    assert commands[0] == ["dvc", "queue", "remove", *names]  # leftovers of an earlier try
    assert [c[:6] for c in commands[1:3]] == [["dvc", "exp", "run", "--queue", "-n", name] for name in names]
    assert commands[3] == ["dvc", "queue", "start", "--jobs", "2"] == commands[-1]
    # no `dvc queue stop` after a success: the workers leave once the queue is empty
    assert ["dvc", "queue", "stop"] not in commands
    assert len(slept) == 2  # polled until both had finished


def test_a_slow_exp_show_is_polled_less_often(monkeypatch):
    """`dvc exp show` of a busy queue costs tens of seconds of a core the runs need: the wait between
    polls grows with the last poll's time (a fast poll keeps POLL_SECONDS)."""
    from experiments import driver as module

    experiment = get_experiment("trajectories-vs-forward-noised-sd3")
    names = [experiment.run_name(v) for v in experiment.variants]
    states = [{names[0]: "running", names[1]: "running"}, {names[0]: "success", names[1]: "running"},
              {names[0]: "success", names[1]: "success"}]
    clock = iter([0.0, 20.0, 100.0, 100.5, 200.0, 200.5])  # two 20 s polls... then a 0.5 s one
    monkeypatch.setattr(module.time, "monotonic", lambda: next(clock))
    slept = []
    run(experiment, log=lambda *a: None, runner=_queue_runner(experiment, states, []), jobs=2, sleep=slept.append)
    assert slept == [module.POLL_COST_FACTOR * 20.0, module.POLL_SECONDS]


def test_queued_runs_left_without_workers_get_them_started_again():
    """DVC's workers left after one task each once (a shutdown from the broker, cause not found): when
    runs stay queued with fewer running than --jobs for two polls, the wait starts the workers again."""
    experiment = get_experiment("size-and-placement-sd3")
    names = [experiment.run_name(v) for v in experiment.variants]
    calls = []
    states = [{names[0]: "running", names[1]: "queued"}, {names[0]: "success", names[1]: "queued"},
              {names[0]: "success", names[1]: "queued"}, {names[0]: "success", names[1]: "running"},
              {names[0]: "success", names[1]: "success"}]
    logged = []
    run(experiment, log=logged.append, runner=_queue_runner(experiment, states, calls), jobs=2,
        sleep=lambda s: None)
    starts = [c for c in calls if c[:3] == ["dvc", "queue", "start"]]
    assert starts == [["dvc", "queue", "start", "--jobs", "2"]] * 2
    assert any("a worker missing" in line for line in logged)
    # one poll without a running run is not enough (workers may be about to take the next task)
    calls = []
    states = [{names[0]: "success", names[1]: "queued"}, {names[0]: "success", names[1]: "running"},
              {names[0]: "success", names[1]: "success"}]
    run(experiment, log=lambda *a: None, runner=_queue_runner(experiment, states, calls), jobs=2,
        sleep=lambda s: None)
    assert sum(c[:3] == ["dvc", "queue", "start"] for c in calls) == 1


def test_a_worker_that_left_early_is_started_again_while_the_other_runs():
    """Seen on 2026-12-07: one of two workers left after its first task and the other ran the remaining
    runs one at a time. Runs left queued with one running of --jobs 2 for two polls start the missing
    worker; when `dvc queue start` says every worker is up (busy with another experiment's runs, say),
    nothing is logged and the wait goes on."""
    experiment = get_experiment("guidance-interval-sd3")
    a, b, c = [experiment.run_name(v) for v in experiment.variants]
    one_left = [{a: "running", b: "queued", c: "queued"}, {a: "running", b: "queued", c: "queued"},
                {a: "running", b: "running", c: "queued"}, {a: "success", b: "running", c: "running"},
                {a: "success", b: "success", c: "success"}]
    calls, logged = [], []
    run(experiment, log=logged.append, runner=_queue_runner(experiment, one_left, calls), jobs=2,
        sleep=lambda s: None)
    assert [c for c in calls if c[:3] == ["dvc", "queue", "start"]] == [["dvc", "queue", "start", "--jobs", "2"]] * 2
    assert sum("a worker missing" in line for line in logged) == 1
    # two running and one queued: every worker is busy, no start
    calls = []
    both = [{a: "running", b: "running", c: "queued"}] * 3 + [{a: "success", b: "success", c: "success"}]
    run(experiment, log=lambda *a: None, runner=_queue_runner(experiment, both, calls), jobs=2,
        sleep=lambda s: None)
    assert sum(c[:3] == ["dvc", "queue", "start"] for c in calls) == 1
    # DVC answers that it started no worker (all up): the wait says nothing and polls on
    calls, logged = [], []
    fake = _queue_runner(experiment, one_left, calls)

    def runner(command, **kwargs):
        if command[:3] == ["dvc", "queue", "start"] and kwargs.get("stdout") not in (None, subprocess.DEVNULL):
            kwargs["stdout"].write("Started '0' new experiments task queue worker.\n")
        return fake(command, **kwargs)

    run(experiment, log=logged.append, runner=runner, jobs=2, sleep=lambda s: None)
    assert sum(c[:3] == ["dvc", "queue", "start"] for c in calls) == 2
    assert not any("a worker missing" in line for line in logged)


def test_sigterm_stops_the_queued_runs_as_ctrl_c_does(monkeypatch, capsys):
    """`kill` (SIGTERM) of `stages.experiments run` while it waits: the queue's workers are not its
    children, so it kills the experiment's runs and stops the workers, says so, exits 143 (128 + SIGTERM;
    Ctrl-C: 130) and puts the previous SIGTERM handler back. A real signal to this process."""
    import functools
    import os
    import signal

    from experiments import driver as experiments
    from stages import experiments as cli

    experiment = get_experiment("trajectories-vs-forward-noised-sd3")
    names = [experiment.run_name(v) for v in experiment.variants]
    calls = []
    runner = _queue_runner(experiment, [{n: "running" for n in names}] * 5, calls)
    monkeypatch.setattr(cli, "run", functools.partial(experiments.run, runner=runner,
                                                      sleep=lambda s: os.kill(os.getpid(), signal.SIGTERM)))
    def unhandled(signum, frame):  # what the test sees if `run` leaves SIGTERM alone (not a dead pytest)
        raise AssertionError("SIGTERM reached the previous handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert cli.main(["run", experiment.name, "--jobs", "2"]) == 143
        assert calls[-2:] == [["dvc", "queue", "kill", *names], ["dvc", "queue", "stop"]]
        assert "interrupted (SIGTERM): the runs of trajectories-vs-forward-noised-sd3 were stopped" in \
            capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, before)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie has finished


def _interrupt(script: str, pid_file: Path, delays: tuple[float, ...]) -> None:
    """Run ``script`` through run_in_group, send this process SIGTERM after each of ``delays``, and check
    that the interrupt came through well before the grace ran out and the child in pid_file is gone."""
    import os
    import signal
    import threading
    import time

    from experiments import driver as experiments

    for delay in delays:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), experiments.terminate_as_interrupt():
        experiments.run_in_group(["sh", "-c", script])
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; the child's exit is seen a moment later
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


@pytest.mark.crash
def test_an_interrupted_command_stops_with_everything_it_started(monkeypatch, tmp_path):
    """SIGTERM while `run` waits for a command (`dvc repro` of the shared stages, say): the command's
    whole process group is stopped, the stage dvc started included, and SIGKILL follows when SIGINT is
    ignored (as in a background job). subprocess.run killed dvc alone and left its stage running."""
    from experiments import driver as experiments

    done = experiments.run_in_group(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    pid_file = tmp_path / "child.pid"
    # a parent and a child that both ignore SIGINT; the parent waits for the child (like dvc for its stage)
    script = f"trap '' INT; sleep 300 & echo $! > {pid_file}; wait"
    monkeypatch.setattr(experiments, "GRACE_SECONDS", 1)
    _interrupt(script, pid_file, (1.0,))
    # a second interrupt while the group is given its grace: SIGKILL at once
    monkeypatch.setattr(experiments, "GRACE_SECONDS", 60)
    _interrupt(script, pid_file, (1.0, 2.0))


def test_a_failing_exp_show_while_waiting_is_asked_again(monkeypatch):
    """DVC's `exp show` fails now and then while a queue worker creates or removes its temporary copy;
    the wait asks again, and gives up only after SHOW_RETRIES failures in a row."""
    from experiments import driver as experiments

    experiment = get_experiment("trajectories-vs-forward-noised-sd3")
    names = [experiment.run_name(v) for v in experiment.variants]
    race = "ERROR: failed to show experiments - directory '.dvc/tmp/exps/tmpz7w5hmbl/.dvc' does not exist"

    def flaky(failing_polls: int):
        calls, shows = [], {"n": 0}
        good = _queue_runner(experiment, [{n: "running" for n in names}, {n: "success" for n in names}], calls)

        def runner(command, **kwargs):
            if command[:3] == ["dvc", "exp", "show"]:
                shows["n"] += 1
                if 2 <= shows["n"] < 2 + failing_polls:  # the first show (before queueing) succeeds
                    calls.append(command)
                    return subprocess.CompletedProcess(command, 1, "", race)
            return good(command, **kwargs)
        return runner, calls

    runner, calls = flaky(2)
    logged = []
    run(experiment, log=logged.append, runner=runner, jobs=2, sleep=lambda s: None)
    assert sum("asking again" in line for line in logged) == 2 and ["dvc", "queue", "stop"] not in calls
    runner, calls = flaky(100)
    with pytest.raises(AgdError, match=f"{experiments.SHOW_RETRIES} times in a row"):
        run(experiment, log=lambda *a: None, runner=runner, jobs=2, sleep=lambda s: None)
    assert calls[-1] == ["dvc", "queue", "stop"]


def test_a_failed_queued_run_stops_the_wait_with_its_log():
    experiment = get_experiment("trajectories-vs-forward-noised-sd3")
    names = [experiment.run_name(v) for v in experiment.variants]
    calls = []
    states = [{names[0]: "running", names[1]: "failed"}]
    with pytest.raises(AgdError, match=f"runs failed \\({names[1]}: /logs/{names[1]}.out\\)"):
        run(experiment, log=lambda *a: None, runner=_queue_runner(experiment, states, calls), jobs=2,
            sleep=lambda s: None)
    assert calls[-1] == ["dvc", "queue", "stop"]
    # a finished queued run counts as finished when its table is collected (a queued one does not)
    experiment = get_experiment("trajectories-vs-forward-noised")
    names = [experiment.run_name(v) for v in experiment.variants]
    shown = fake_show({name: {"gap_closed": 0.3} for name in names})
    for entry, state in zip(shown[1]["experiments"], ("success", "queued")):
        entry["executor"] = {"state": state, "name": "dvc-task", "local": {}}
    with pytest.raises(AgdError, match=f"no finished DVC experiment '{names[1]}'"):
        collect(experiment, shown)
    shown[1]["experiments"][1]["executor"]["state"] = "success"
    assert [row["gap_closed"] for row in collect(experiment, shown)] == [0.3, 0.3]


@pytest.mark.crash
def test_collect_skips_a_killed_run_listed_beside_the_finished_one():
    """DVC lists a killed `exp run --temp` as running forever (and `exp remove` refuses its name); the
    finished run of the same name is the one to read, and a name with only a killed run is not done."""
    experiment = get_experiment("trajectories-vs-forward-noised")
    names = [experiment.run_name(v) for v in experiment.variants]
    shown = fake_show({names[0]: {"gap_closed": 0.1}, names[1]: {"gap_closed": 0.8}})
    killed = {"revs": [{"rev": "dead", "name": names[0], "error": None, "experiments": None,
                        "data": {"metrics": {"data/eval/summary.json": {"data": {"gap_closed": 0.5}}}}}],
              "executor": {"state": "running", "name": "tempdir", "local": None}, "name": names[0]}
    shown[1]["experiments"].insert(0, killed)
    assert [row["gap_closed"] for row in collect(experiment, shown)] == [0.1, 0.8]
    shown[1]["experiments"] = [killed]
    with pytest.raises(AgdError, match=f"no finished DVC experiment '{names[0]}'"):
        collect(experiment, shown)


def test_collect_writes_table_plot_and_readme_block(tmp_path):
    experiment = get_experiment("trajectories-vs-forward-noised")
    shown = fake_show({
        "trajectories-vs-forward-noised-trajectories": {"gap_closed": 0.81, "mean_accuracy_agd": 0.99,
                                                        "max_fidelity_ratio": 0.05},
        "trajectories-vs-forward-noised-forward-noised": {"gap_closed": 0.42, "mean_accuracy_agd": 0.95,
                                                          "max_fidelity_ratio": 0.3},
    })
    rows = collect(experiment, shown)
    assert [r["gap_closed"] for r in rows] == [0.81, 0.42]  # the root pipeline's summary, not a text one
    assert rows[0]["mean_fid_agd"] is None  # a metric the run lacks is shown as n/a
    folder = write_results(experiment, rows, tmp_path)
    with open(folder / "results.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["trajectories", "forward-noised"]
    table = (folder / "results.md").read_text()
    assert "| CFG trajectories (AGD) | 0.810 | 0.990 |" in table and "n/a" in table
    assert (folder / "plot.png").read_bytes()[:4] == b"\x89PNG"
    block = readme_block(experiment, folder)
    assert block.startswith("<!-- results:experiment-trajectories-vs-forward-noised:start -->")
    assert "python -m stages.experiments run trajectories-vs-forward-noised" in block and table.strip() in block
    with pytest.raises(AgdError, match="no finished DVC experiment 'trajectories-vs-forward-noised-trajectories'"):
        collect(experiment, fake_show({}))


def test_cli_lists_and_prints_commands_without_running_anything(tmp_path):
    listed = run_cli("stages.experiments", "list", cwd=REPO)
    assert listed.returncode == 0 and "trajectories-vs-forward-noised" in listed.stdout
    printed = run_cli("stages.experiments", "commands", "trajectories-vs-forward-noised", "--jobs", "1", cwd=REPO)
    assert printed.returncode == 0 and printed.stdout.count("dvc exp run --temp") == 2
    queued = run_cli("stages.experiments", "commands", "trajectories-vs-forward-noised", "--jobs", "4", cwd=REPO)
    assert queued.stdout.count("dvc exp run --queue") == 2 and "dvc queue start --jobs 2" in queued.stdout
    bad = run_cli("stages.experiments", "run", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown experiment 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not Path(tmp_path / "experiments").exists()


@pytest.mark.bad_input
def test_printed_commands_paste_into_a_shell_and_misplaced_flags_are_refused_before_running(capsys, monkeypatch):
    """`commands` prints each command shell-quoted (a list param holds spaces), so pasting it runs exactly
    what `run` would; `run --from-results` is refused up front, not after an hour of runs."""
    from stages import experiments as cli

    experiment = get_experiment("unseen-w")
    assert cli.main(["commands", "unseen-w", "--jobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert prepare_command(experiment) is None  # its variants change stage one: nothing to prepare
    assert [shlex.split(line) for line in lines[:-1]] == run_commands(experiment, queue=True)
    assert any("[2.0, 3.0" in part for part in shlex.split(lines[0]))  # one argument, spaces and all
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("run started"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "unseen-w", "--from-results"])
    assert exit_.value.code == 2 and "--from-results goes with report only" in capsys.readouterr().err


def test_curve_experiments_plot_each_group_against_x(tmp_path):
    """size-and-placement draws gap closed against the adapters' share of the base, a line per group;
    a run without a value (n/a) is left out of the curve, not drawn at 0."""
    import matplotlib.pyplot as plt

    experiment = get_experiment("size-and-placement")
    assert experiment.x == "adapter_share" and experiment.log_x
    summaries = {experiment.run_name(v): {"adapter_share": 0.01 * (i + 1), "adapter_parameters": 1000 * (i + 1),
                                          "gap_closed": 0.1 * i, "max_fidelity_ratio": 0.5 / (i + 1)}
                 for i, v in enumerate(experiment.variants)}
    summaries[experiment.run_name(experiment.variants[0])]["gap_closed"] = None
    rows = collect(experiment, fake_show(summaries))
    drawn = []
    original = plt.Axes.plot

    def spy(ax, xs, ys, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(xs), list(ys)))
        return original(ax, xs, ys, *args, **kwargs)

    plt.Axes.plot = spy
    try:
        folder = write_results(experiment, rows, tmp_path)
    finally:
        plt.Axes.plot = original
    with open(folder / "results.csv") as f:
        assert "adapter_share" in next(csv.reader(f))
    groups = {v.group or v.name for v in experiment.variants}  # an ungrouped variant: a point of its own
    assert {label for label, *_ in drawn} == groups
    first_panel = drawn[:len(groups)]
    bottleneck = next(d for d in first_panel if d[0] == "bottleneck")
    assert bottleneck[1] == sorted(bottleneck[1]) and 0.01 not in bottleneck[1]  # sorted by x, n/a left out
    assert "| bottleneck, width 4, embed 16 | 0.010 | 1,000 | n/a |" in (folder / "results.md").read_text()


def test_report_from_results_renders_again_from_the_tracked_table(tmp_path):
    """read_results gives back exactly the rows write_results wrote (ints, floats, n/a), so re-rendering
    from results.csv rewrites the same table; a table of other variants or a damaged cell is refused."""
    experiment = get_experiment("size-and-placement")
    summaries = {experiment.run_name(v): {"adapter_share": 0.0123456789 * (i + 1), "adapter_parameters": 4656 + i,
                                          "gap_closed": None if i == 2 else 0.1 * i + 1e-9,
                                          "max_fidelity_ratio": 1 / 3, "max_accuracy_drop_points": 1.0,
                                          "mean_fid_agd": 12.5, "speed_ratio_agd_over_cfg": 2}
                 for i, v in enumerate(experiment.variants)}
    rows = collect(experiment, fake_show(summaries))
    folder = write_results(experiment, rows, tmp_path)
    table, csv_text = (folder / "results.md").read_text(), (folder / "results.csv").read_text()
    again = read_results(experiment, tmp_path)
    assert again == rows
    assert isinstance(again[0]["adapter_parameters"], int) and again[2]["gap_closed"] is None
    write_results(experiment, again, tmp_path)
    assert (folder / "results.md").read_text() == table and (folder / "results.csv").read_text() == csv_text

    (folder / "results.csv").write_text(csv_text.replace("4656", "forty"))
    with pytest.raises(AgdError, match="adapter_parameters holds 'forty'"):
        read_results(experiment, tmp_path)
    lines = csv_text.splitlines()
    (folder / "results.csv").write_text("\n".join(lines[:-1]) + "\n")  # a variant's row lost
    with pytest.raises(AgdError, match="not the experiment's"):
        read_results(experiment, tmp_path)
    (folder / "results.csv").write_text(csv_text[:csv_text.rindex(",")])  # cut inside the last row
    with pytest.raises(AgdError, match=rf"line {len(lines)}: cut short"):
        read_results(experiment, tmp_path)
    (folder / "results.csv").write_text("\n".join([lines[0], lines[1] + ",extra", *lines[2:]]) + "\n")
    with pytest.raises(AgdError, match="line 2: too many cells"):
        read_results(experiment, tmp_path)
    (folder / "results.csv").write_bytes(b"variant,run\n\xff\xfe,\x00\n")
    with pytest.raises(AgdError, match="not a readable CSV table"):
        read_results(experiment, tmp_path)
    with pytest.raises(AgdError, match="does not exist"):
        read_results(get_experiment("unseen-w"), tmp_path)


def test_columns_with_a_bound_print_it_and_a_table_written_before_bounds_still_renders(tmp_path):
    """A column judged on a 95 % bound prints it after the point (upper for ..._high, lower for
    ..._low); a results.csv written before the bounds were recorded renders its points alone."""
    experiment = get_experiment("size-and-placement")
    summaries = {experiment.run_name(v): {"adapter_share": 0.02, "adapter_parameters": 7676, "gap_closed": 0.49,
                                          "max_fidelity_ratio": 0.098, "max_fidelity_ratio_high": 0.12,
                                          "max_accuracy_drop_points": 1.6, "max_accuracy_drop_points_high": 2.25,
                                          "guidance_recovered": 0.9, "guidance_recovered_low": 0.84,
                                          "mean_fid_agd": 50.9, "speed_ratio_agd_over_cfg": 2.5}
                 for v in experiment.variants}
    folder = write_results(experiment, collect(experiment, fake_show(summaries)), tmp_path)
    table = (folder / "results.md").read_text()
    assert "| 0.098 (≤ 0.120) | 1.6 (≤ 2.2) | 0.900 (≥ 0.840) |" in table
    with open(folder / "results.csv", newline="") as f:
        stored = list(csv.DictReader(f))
    bounds = ["max_fidelity_ratio_high", "max_accuracy_drop_points_high", "guidance_recovered_low"]
    with open(folder / "results.csv", "w", newline="") as f:  # as an older run wrote it
        writer = csv.DictWriter(f, [k for k in stored[0] if k not in bounds])
        writer.writeheader()
        writer.writerows({k: v for k, v in row.items() if k not in bounds} for row in stored)
    rows = read_results(experiment, tmp_path)
    assert all(rows[0][key] is None for key in bounds)
    assert "| 0.098 | 1.6 | 0.900 |" in markdown_table(experiment, rows)


@pytest.mark.parametrize("cell", ["nan", "inf", "-inf", "NaN", "1_0", " 1", "1e999", "0x10", "1,5"])
def test_results_csv_cells_must_be_finite_plain_decimals(tmp_path, cell):
    """nan, inf and 1_0 are numbers to Python's float() and int(), not to the table: each is refused naming
    the file, its line and column, before anything reaches results.md or the README."""
    experiment = get_experiment("size-and-placement")
    summaries = {experiment.run_name(v): {"adapter_share": 0.5, "adapter_parameters": 4656 + i, "gap_closed": 0.25,
                                          "max_fidelity_ratio": 1 / 3, "max_accuracy_drop_points": -1.0,
                                          "mean_fid_agd": 1.5e-7, "speed_ratio_agd_over_cfg": 2}
                 for i, v in enumerate(experiment.variants)}
    folder = write_results(experiment, collect(experiment, fake_show(summaries)), tmp_path)
    assert read_results(experiment, tmp_path)[0]["mean_fid_agd"] == 1.5e-7  # what write_results writes reads back
    path = folder / "results.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[3][rows[0].index("gap_closed")] = cell
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(AgdError) as err:
        read_results(experiment, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 4: column gap_closed holds {cell!r}, not a finite decimal number"), message
    assert "\n" not in message and "git checkout" in message


@pytest.mark.bad_input
def test_a_results_csv_that_is_a_folder_is_one_line(tmp_path, monkeypatch):
    experiment = get_experiment("size-and-placement")
    (tmp_path / experiment.name / "results.csv").mkdir(parents=True)
    with pytest.raises(AgdError, match=r"results.csv: cannot read it \(it is a folder, not a file\); restore it"):
        read_results(experiment, tmp_path)
    from stages import experiments as cli

    monkeypatch.setattr(cli, "read_results", lambda experiment: read_results(experiment, tmp_path))
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["report", experiment.name, "--from-results", "--readme", str(tmp_path / "README.md")])
    assert code == 2 and err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1, err.getvalue()


def test_a_run_whose_summary_holds_nan_is_not_tabulated(tmp_path):
    experiment = get_experiment("size-and-placement")
    summaries = {experiment.run_name(v): {"adapter_share": 0.5, "adapter_parameters": 10, "gap_closed": float("nan"),
                                          "max_fidelity_ratio": 0.5, "max_accuracy_drop_points": 1.0,
                                          "mean_fid_agd": 1.0, "speed_ratio_agd_over_cfg": 2}
                 for v in experiment.variants}
    with pytest.raises(AgdError, match="gap_closed = nan, not a finite number"):
        collect(experiment, fake_show(summaries))


def test_one_run_experiments_read_each_row_from_its_own_summary_file():
    """fine-tuned-derivatives is one DVC experiment of pipelines/derivatives/dvc.yaml; each row is one
    of its summary files (the reference row: the default pipeline's)."""
    experiment = get_experiment("fine-tuned-derivatives")
    assert run_commands(experiment) == [["dvc", "exp", "run", "--temp", "-n", "fine-tuned-derivatives-all",
                                         "pipelines/derivatives/dvc.yaml"]]
    paths = {v.summary: 0.1 * i for i, v in enumerate(experiment.variants)}
    shown = fake_show({})
    metrics = {path: {"data": {"gap_closed": value}} for path, value in paths.items()}
    shown[1]["experiments"] = [{"revs": [{"rev": "r", "name": "fine-tuned-derivatives-all", "error": None,
                                          "experiments": None, "data": {"rev": "r", "metrics": metrics}}],
                                "executor": None, "name": "fine-tuned-derivatives-all"}]
    rows = collect(experiment, shown)
    assert [r["gap_closed"] for r in rows] == list(paths.values())
    assert rows[0]["variant"] == "original" and experiment.variants[0].summary == "data/eval/summary.json"
    with pytest.raises(ConfigError, match="set different params"):
        from dataclasses import replace

        broken = replace(experiment, variants=(experiment.variants[0],
                                               replace(experiment.variants[1], params={"train.width": 8})))
        broken.runs()


def _declared_metrics() -> set[str]:
    """Every metrics file a dvc.yaml of the repository declares (foreach items and ${section.key} from
    the root params expanded): what `dvc exp show` reports."""
    root_params = yaml.safe_load((REPO / "params.yaml").read_text())
    found = set()
    for path in [REPO / "dvc.yaml", *sorted(REPO.glob("pipelines/*/dvc.yaml"))]:
        for stage in yaml.safe_load(path.read_text())["stages"].values():
            items = stage.get("foreach", [None])
            for entry in stage.get("do", stage).get("metrics", []):
                name = next(iter(entry)) if isinstance(entry, dict) else entry
                for item in items:
                    found.add(re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(root_params[m[1]][m[2]]),
                                     name.replace("${item}", str(item))))
    return found


def test_every_row_reads_a_summary_a_pipeline_declares_as_metrics():
    declared = _declared_metrics()
    assert {"data/eval/summary.json", "data/text/sd3/eval/summary.json"} <= declared
    for experiment in EXPERIMENTS.values():
        for variant in experiment.variants:
            assert variant.summary in declared, (experiment.name, variant.name)


def test_sd3_derivatives_run_full_and_lora_at_once_with_two_rows_each():
    """fine-tuned-derivatives-sd3: a DVC experiment per fine-tune (queued side by side), each giving the
    original adapters' row and the retrained adapters' row; the reference row is the SD3 default's."""
    experiment = get_experiment("fine-tuned-derivatives-sd3")
    commands = run_commands(experiment, queue=True)
    assert [c[c.index("-n") + 1] for c in commands] == ["fine-tuned-derivatives-sd3-lora",
                                                         "fine-tuned-derivatives-sd3-full"]
    assert all(c[-1] == "pipelines/derivatives-sd3/dvc.yaml" for c in commands)
    assert 'pipelines/derivatives-sd3/params.yaml:finetune.mode="full"' in commands[1]
    shown = fake_show({})
    runs = []
    for i, mode in enumerate(("lora", "full")):
        metrics = {f"data/derived/sd3/eval-{kind}/summary.json": {"data": {"gap_closed": i + j / 10}}
                   for j, kind in enumerate(("original", "retrained"))}
        metrics["data/text/sd3/eval/summary.json"] = {"data": {"gap_closed": 0.8}}
        name = f"fine-tuned-derivatives-sd3-{mode}"
        runs.append({"revs": [{"rev": f"r{i}", "name": name, "error": None, "experiments": None,
                               "data": {"rev": f"r{i}", "metrics": metrics}}], "executor": None, "name": name})
    shown[1]["experiments"] = runs
    rows = collect(experiment, shown)
    assert [(r["variant"], r["gap_closed"]) for r in rows] == [
        ("original", 0.8), ("full-original", 1.0), ("full-retrained", 1.1), ("lora-original", 0.0),
        ("lora-retrained", 0.1)]


def test_show_prints_each_runs_state_and_results_within_the_terminal_width():
    """`stages.experiments show NAME`: plain `dvc exp show` lists every param, metric and dependency of
    every pipeline (hundreds of columns); this table holds one row per variant and wraps to the width."""
    from rich.console import Console

    from experiments import overview
    from stages.experiments import show

    experiment = get_experiment("baseline-sweep")
    first, second = (experiment.run_name(v) for v in experiment.variants[:2])
    summary = {"gap_closed": 0.3125, "max_fidelity_ratio": 0.5, "max_fidelity_ratio_high": 0.55,
               "max_accuracy_drop_points": 4.0, "max_accuracy_drop_points_high": 5.25,
               "guidance_recovered": 0.625, "guidance_recovered_low": 0.5, "mean_fid_agd": 18.0, "mean_fid_cfg": 47.0}
    shown = fake_show({first: summary, second: {"gap_closed": 0.9}})
    shown[1]["experiments"][1]["executor"] = {"state": "running", "name": "dvc-task", "local": {}}
    rows = overview(experiment, shown)
    assert [row["state"] for row in rows] == ["finished", "running"] + ["not run"] * (len(rows) - 2)
    assert rows[0]["cells"] == ["0.312", "0.500 (≤ 0.550)", "4.0 (≤ 5.2)", "0.625 (≥ 0.500)", "18.00", "47.00"]
    assert all(cell == "" for row in rows[1:] for cell in row["cells"])  # a running run shows no results yet
    console = Console(width=120, record=True, color_system=None)
    assert show(experiment, shown, console=console) == 0
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 120
    assert text.count("not run") == len(rows) - 2 and text.count("running") == 1 and "0.312" in text
