"""stages.benchmark's command line: bad values stop it at once, and by default it writes nothing
that git tracks (data/benchmarks/, not docs/benchmarks/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def benchmark(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.benchmark", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["step-time", "--repeats", "-1"], "--repeats"),
    (["step-time", "--repeats", "x"], "--repeats"),
    (["step-time", "--batch-sizes", "1,a"], "--batch-sizes"),
    (["step-time", "--batch-sizes", "0"], "--batch-sizes"),
    (["step-time", "--batch-sizes", ","], "--batch-sizes"),
    (["parameters", "--architectures", "sd-99"], "unknown architecture"),
    (["loader", "--architectures", "toy-dit-8x8"], "--architectures"),
    (["nope"], "invalid choice"),
    (["lossy", "--keepbits", "11"], "--keepbits"),
    (["gap-closed", "--trajectories", "0"], "--trajectories"),
    (["gap-closed", "--adapters", "/nonexistent/adapters"], "--adapters"),
    (["storage", "--store", "/nonexistent/store"], "--store"),
    (["parameters", "--out", "/"], "--out"),
    (["verify-cache", "--shards", "0"], "--shards"),
    (["loader", "--shards", "5"], "--shards"),
    (["adapter-cost", "--widths", "0"], "--widths"),
    (["adapter-cost", "--widths", "8,x"], "--widths"),
    (["step-time", "--widths", "8"], "--widths"),
])
def test_bad_values_fail_in_one_line(args, message, tmp_path):
    result = benchmark(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "docs").exists()


def test_default_output_is_untracked(tmp_path):
    result = benchmark("parameters", "--architectures", "toy-dit-8x8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "benchmarks" / "parameters.json").is_file()
    assert not (tmp_path / "docs").exists()
