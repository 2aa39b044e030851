"""What `pip install agd-pipeline` gives a user: a wheel whose requirements are ranges (the user's
torch stays), whose optional packages are extras, that installs agd_pipeline and nothing else as a
top-level package, and whose `agd` console script runs the same commands as `python -m stages.X`.
The library and its commands load without any extra's package."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO

from agd_pipeline.commands import COMMANDS
from agd_pipeline.errors import EXTRAS

# the packages each extra must bring (pip names, normalised), and that the core must not
EXTRA_PACKAGES = {"eval": {"clean-fid", "torchvision", "scikit-learn", "scipy", "matplotlib"}, "repro": {"dvc"},
                  "finetune": {"peft"}, "distributed": {"dask"}, "tensorboard": {"tensorboard"},
                  "dev": {"tensorboard"}}
OPTIONAL = {"clean-fid", "torchvision", "scikit-learn", "scipy", "matplotlib", "dvc", "peft", "tensorboard"}
CORE = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "zarr", "numcodecs", "webdataset", "dask"}


def entry_point() -> tuple[str, str]:
    """(module, function) of the `agd` console script, as pyproject.toml declares it."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["agd"]
    module, _, function = spec.partition(":")
    return module, function


def agd_main():
    """The function the `agd` script calls, imported from this checkout (the venv's installed `agd`
    may belong to another checkout)."""
    module, function = entry_point()
    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the repository's packaging inputs (setuptools writes build/
    and *.egg-info next to the sources, so not in the checkout). stages/ and benchmarks/ are copied
    too: the wheel must leave them out, not merely not find them."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("agd_pipeline", "stages", "benchmarks"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-index", "--quiet", "-w", str(out), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("agd_pipeline-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(f".dist-info/{name}")]
    return wheel.read(member).decode()


def requirements(wheel: zipfile.ZipFile) -> list[Requirement]:
    return [Requirement(line.partition(":")[2].strip()) for line in dist_info(wheel, "METADATA").splitlines()
            if line.startswith("Requires-Dist:")]


def extra_of(requirement: Requirement) -> str | None:
    """The extra a requirement belongs to (its ``extra == "..."`` marker), None for the core."""
    marker = str(requirement.marker or "")
    return marker.split('"')[1] if "extra ==" in marker else None


def test_the_wheel_pins_nothing_and_keeps_optional_packages_in_extras(wheel):
    found = requirements(wheel)
    pinned = [str(r) for r in found if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins in Requires-Dist (they replace the user's packages): {pinned}"
    core = {r.name.lower() for r in found if extra_of(r) is None}
    assert CORE <= core, f"core requirements missing: {sorted(CORE - core)}"
    assert not core & OPTIONAL, f"optional packages in the core requirements: {sorted(core & OPTIONAL)}"
    (torch,) = [r for r in found if r.name == "torch"]
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.14.1"), torch  # several minors
    by_extra: dict[str, set[str]] = {}
    for r in found:
        if extra_of(r):
            by_extra.setdefault(extra_of(r), set()).add(r.name.lower())
    for extra, packages in EXTRA_PACKAGES.items():
        lacking = packages - by_extra.get(extra, set())
        assert not lacking, f"[{extra}] lacks {sorted(lacking)}"
    provided = {line.partition(":")[2].strip() for line in dist_info(wheel, "METADATA").splitlines()
                if line.startswith("Provides-Extra:")}
    assert {"eval", "repro", "finetune", "distributed", "all", "dev"} <= provided, provided


def test_the_wheel_installs_only_agd_pipeline(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"agd_pipeline"}, f"top-level entries besides agd_pipeline: {sorted(top - {'agd_pipeline'})}"
    assert dist_info(wheel, "top_level.txt").split() == ["agd_pipeline"]
    names = set(wheel.namelist())
    missing = [c for c in ("__main__", *COMMANDS) if f"agd_pipeline/commands/{c}.py" not in names]
    assert not missing, f"commands missing from the wheel: {missing}"


def test_the_wheel_declares_the_agd_script(wheel, capsys):
    """The wheel's console script `agd` names a function that exists and is the dispatcher."""
    text = dist_info(wheel, "entry_points.txt")
    section = text.partition("[console_scripts]")[2].partition("[")[0]
    scripts = dict(line.replace(" ", "").split("=", 1) for line in section.splitlines() if "=" in line)
    assert "agd" in scripts, text
    module, _, function = scripts["agd"].partition(":")
    main = getattr(importlib.import_module(module), function, None)
    assert callable(main), f"the agd script names {scripts['agd']}, which does not exist"
    assert main(["--help"]) == 0 and "generate" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the agd script


def test_agd_help_lists_every_command(capsys):
    assert agd_main()(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS), out
    # each is also `python -m stages.<command>` in the repository (dvc.yaml runs those)
    assert all((REPO / "stages" / f"{name}.py").is_file() for name in COMMANDS)
    # the embedded defaults' recipes are the repository's (defaults/commands/), not the library's
    assert not {"base", "text_data", "text_base", "finetune"} & set(listed)
    assert agd_main()(["finetune"]) == 2 and "unknown command 'finetune'" in capsys.readouterr().err


def test_agd_runs_the_command_it_names(capsys):
    """`agd generate --help` is the generate stage's own parser, named as the user typed it."""
    with pytest.raises(SystemExit) as stop:
        agd_main()(["generate", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: agd generate ") and "--trajectories-per-class" in out, out[:300]
    # the usage line is back to `python -m stages.generate` for the next in-process caller
    import stages.generate

    with pytest.raises(SystemExit):
        stages.generate.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m stages.generate ")


@pytest.mark.bad_input
def test_agd_refuses_an_unknown_command_in_one_line(capsys):
    assert agd_main()(["genrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown command 'genrate'" in err and "agd --help" in err, err


def test_the_console_script_as_a_process():
    """What the installed script does: import the entry point and sys.exit(main()) with the command
    line in sys.argv (the path where main sets up the process's signal handling)."""
    module, function = entry_point()
    script = f"import sys; from {module} import {function} as main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", script, "convert", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: agd convert "), result.stdout[:300]


def test_the_console_script_ends_quietly_when_its_reader_goes():
    """`agd --help | head -1`: the reader closes the pipe before the help is written; the script ends as
    Unix tools do (SIGPIPE), without a BrokenPipeError traceback."""
    module, function = entry_point()
    script = f"import sys, time; time.sleep(1); from {module} import {function} as main; sys.exit(main())"
    process = subprocess.Popen([sys.executable, "-c", script, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == -13 and "Traceback" not in stderr, stderr  # -SIGPIPE


# ------------------------------------------------------------------- no extra needed to import


OPTIONAL_MODULES = sorted(EXTRAS)  # import names: matplotlib, cleanfid, sklearn, scipy, torchvision, ...


def test_the_library_and_its_commands_load_no_optional_package():
    """Importing agd_pipeline, its pipelines and adapters, and every command module (what `agd X`
    loads before it parses its options) imports none of the extras' packages, so a core install
    can do all of it."""
    modules = ["agd_pipeline", "agd_pipeline.pipelines", "agd_pipeline.adapters", "agd_pipeline.commands.__main__",
               *(f"agd_pipeline.commands.{c}" for c in COMMANDS)]
    script = ("import importlib, sys\n"
              f"for m in {modules!r}: importlib.import_module(m)\n"
              f"print(' '.join(m for m in {OPTIONAL_MODULES!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [], f"loaded by importing the library: {result.stdout.split()}"


def _required_in(function: ast.AST) -> set[str]:
    """The optional packages ``require("...")`` calls in ``function`` ask for (their top names)."""
    return {node.args[0].value.partition(".")[0] for node in ast.walk(function)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
            and node.args and isinstance(node.args[0], ast.Constant)}


def _optional_imports(node: ast.AST) -> set[str]:
    """The optional packages (EXTRAS' import names) an import statement imports."""
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
        [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
    tops = {"distributed" if n.startswith("dask.distributed") else n.partition(".")[0] for n in names}
    return tops & set(EXTRAS)


def import_problems(path: Path) -> list[str]:
    """Optional packages imported at module level, or in a function without asking
    agd_pipeline.errors.require for them first (whose error names the extra to install)."""
    tree = ast.parse(path.read_text())
    problems = [f"{path.name}:{node.lineno}: module-level import of {sorted(_optional_imports(node))}"
                for node in tree.body if _optional_imports(node)]
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            unasked = {(node.lineno, top) for node in ast.walk(function) for top in _optional_imports(node)
                       if top not in _required_in(function)}
            problems += [f"{path.name}:{line}: {top} imported without require()" for line, top in sorted(unasked)]
    return problems


def test_optional_packages_are_imported_through_require():
    problems = [p for path in sorted((REPO / "agd_pipeline").rglob("*.py")) for p in import_problems(path)]
    assert not problems, "; ".join(problems)


def test_the_import_check_sees_a_bare_import(tmp_path):
    """Not vacuous: a module-level import and a function's import without require() are caught;
    one after require() is not."""
    module = tmp_path / "m.py"
    module.write_text("import matplotlib\n\ndef f():\n    from cleanfid import fid\n\n"
                      "def g():\n    require('sklearn.datasets', 'x')\n    from sklearn.model_selection import a\n\n"
                      "def h():\n    from dask.distributed import Client\n")
    problems = import_problems(module)
    assert len(problems) == 3 and "module-level" in problems[0], problems
    assert "cleanfid" in problems[1] and "distributed" in problems[2], problems


@pytest.mark.bad_input
def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    """require() of a package that is not installed: MissingExtra, saying what needs it and the
    pip command of its extra (sys.modules[name] = None makes Python's import fail as for a missing one)."""
    from agd_pipeline.errors import AgdError, MissingExtra, require

    for name, (package, extra) in EXTRAS.items():
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(MissingExtra) as caught:
            require(name, "the thing")
        message = str(caught.value)
        assert isinstance(caught.value, AgdError) and "\n" not in message
        assert message.startswith("the thing: needs ") and package in message, message
        assert f"pip install 'agd-pipeline[{extra}]'" in message, message


def test_stages_modules_are_the_library_commands():
    """`import stages.<command>` gives the module agd runs (a test that patches stages.train
    patches the real one), and each shim hands over to the command of its own name."""
    for name in COMMANDS:
        shim = importlib.import_module(f"stages.{name}")
        assert shim is importlib.import_module(f"agd_pipeline.commands.{name}"), name
        assert f"from agd_pipeline.commands import {name} as command" in (REPO / "stages" / f"{name}.py").read_text()


# ------------------------------------------------------- messages name the command as it was run


def test_messages_name_the_command_as_the_user_started_it(tmp_path, capsys):
    """What a message tells the user to run is `agd <command>` under the agd script (an installed user has
    no stages package), and `python -m stages.<command>` when started from the repository."""
    nowhere = str(tmp_path / "nowhere")
    assert agd_main()(["inspect", nowhere]) == 2
    err = capsys.readouterr().err
    assert "`agd generate`" in err and "python -m stages" not in err, err
    assert agd_main()(["sample", "--adapters", " "]) == 2
    err = capsys.readouterr().err
    assert "`agd train`" in err and "python -m stages" not in err, err
    import stages.inspect

    assert stages.inspect.main([nowhere]) == 2
    assert "`python -m stages.generate`" in capsys.readouterr().err


def test_no_message_hardcodes_how_a_command_is_started():
    """Every string of the library that names one of the commands for the user to run goes through
    errors.command_line: a literal `python -m stages.<command>` outside docstrings and comments would be
    wrong for an installed user. (stages.report, .experiments and .benchmark exist only in the repository.)"""
    import re

    found = []
    for path in sorted((REPO / "agd_pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for name in re.findall(r"stages\.(\w+)", node.value):
                    if name in COMMANDS and "python -m" in node.value:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)
