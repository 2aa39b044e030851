"""The library's shape: no import cycles inside agd_pipeline/ (lazy imports inside functions
included), nothing of the repository's (defaults/, stages/, benchmarks/) imported by it, benchmarks
outside it, and the linter clean."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "agd_pipeline"
DEFAULTS = REPO / "defaults"  # the embedded defaults: the repository's, beside the library
# top-level packages of the repository that the library must not import: a user's own model needs none
# of them, and the installed wheel holds none of them
REPOSITORY_ONLY = ("defaults", "stages", "benchmarks", "experiments")


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*packages) -> dict[str, object]:
    """Module name -> file of the library's modules (and those of ``packages``: folders under REPO)."""
    return {module_name(path): path for package in (PACKAGE, *packages) for path in sorted(package.rglob("*.py"))}


def imports_of(path, name: str, known: set[str]) -> set[str]:
    """Every agd_pipeline module ``path`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from package import submodule` imports the submodule; other names come from the module
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycle_in_the_library():
    found = modules()
    graph = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    assert "agd_pipeline.store" in graph and len(graph) > 10, sorted(graph)  # the walk found the library
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def foreign_imports(path, name: str) -> list[str]:
    """What a library module imports from outside the library that it must not: a module of the
    repository (REPOSITORY_ONLY; top level or inside a function), or a relative import climbing out
    of agd_pipeline."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            if node.level - 1 >= len(base):
                found.append(f"{'.' * node.level}{node.module or ''} (climbs out of {base[0]})")
                continue
            targets = [".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))]
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module or ""]
        else:
            continue
        found += [t for t in targets if t.split(".")[0] in REPOSITORY_ONLY]
    return found


def test_the_library_imports_nothing_of_the_repository():
    """agd_pipeline/ holds what a user's own model needs: no module of it imports the embedded defaults,
    the repository's commands, its benchmarks or experiments, at the top or inside a function."""
    found = modules()
    assert len(found) > 10 and "agd_pipeline.evaluation" in found
    offending = {name: bad for name, path in found.items() if (bad := foreign_imports(path, name))}
    assert not offending, f"library modules importing the repository's: {offending}"


def test_the_foreign_import_check_sees_them(tmp_path, monkeypatch):
    """Not vacuous: an import of defaults inside a function, of stages at the top and a relative
    import out of the package are each caught; the library's own imports are not."""
    package = tmp_path / "agd_pipeline"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import json\nfrom . import b\nfrom .sub import c\n"
                                  "def f():\n    from defaults.toy import x\n")
    (package / "b.py").write_text("import stages.generate\nfrom ..benchmarks import y\n")
    (package / "sub" / "c.py").write_text("from ..errors import E\nfrom ... import z\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    found = modules()
    assert foreign_imports(found["agd_pipeline.a"], "agd_pipeline.a") == ["defaults.toy"]
    assert foreign_imports(found["agd_pipeline.b"], "agd_pipeline.b") == ["stages.generate",
                                                                        "..benchmarks (climbs out of agd_pipeline)"]
    assert foreign_imports(found["agd_pipeline.sub.c"], "agd_pipeline.sub.c") == [
        "... (climbs out of agd_pipeline)"]


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """Not vacuous: two modules importing each other lazily are caught."""
    package = tmp_path / "agd_pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text("from agd_pipeline import a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    found = modules()
    assert imports_of(found["agd_pipeline.a"], "agd_pipeline.a", set(found)) == {"agd_pipeline.b"}
    assert imports_of(found["agd_pipeline.b"], "agd_pipeline.b", set(found)) == {"agd_pipeline.a"}


# Modules that cannot change a stage's outputs: a change to them re-runs nothing under DVC. (settings
# prints where each value came from and refuses a base of another family before anything is written.)
NO_EFFECT_ON_OUTPUTS = {"agd_pipeline.errors", "agd_pipeline.locks", "agd_pipeline.interrupts", "agd_pipeline.settings"}


def test_dvc_lists_every_library_module_a_stage_runs():
    """A stage's deps in dvc.yaml cover every agd_pipeline and defaults module its command imports
    (directly, lazily or through other modules), so a code change re-runs the stages it affects."""
    import yaml

    found = modules(DEFAULTS)
    graph = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    text_commands = {"data": "text_data", "base": "text_base"}  # stage name -> stages/<command>.py
    derived_commands = {"evaluate_original": "evaluate", "evaluate_retrained": "evaluate"}
    pipelines = [(REPO / "dvc.yaml", {}), (REPO / "pipelines/text/dvc.yaml", text_commands),
                 (REPO / "pipelines/derivatives/dvc.yaml", derived_commands),
                 (REPO / "pipelines/derivatives-sd3/dvc.yaml", derived_commands),
                 (REPO / "pipelines/variants/dvc.yaml", {}), (REPO / "pipelines/variants-sd3/dvc.yaml", {})]
    for dvc_yaml, commands in pipelines:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
        for stage, spec in stages.items():
            _check_stage_deps(dvc_yaml, commands.get(stage, stage), spec.get("do", spec), found, graph)


def _check_stage_deps(dvc_yaml, stage: str, spec: dict, found: dict, graph: dict) -> None:
    """One stage (the ``do`` of a foreach stage): its deps cover what its command imports."""
    entry = REPO / "stages" / f"{stage}.py"
    reached, todo = set(), list(imports_of(entry, f"stages.{stage}", set(found)))
    todo += judge_modules(stage, spec, found)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    deps = [REPO / d for d in spec["deps"] if "${" not in d]
    assert REPO / "stages" / f"{stage}.py" in deps, f"{dvc_yaml}, {stage}: its own command is not a dependency"
    # the module stages/<stage>.py hands over to: the library's (agd <stage>) or an embedded default's recipe
    commands = [f"{package}.commands.{stage}" for package in ("agd_pipeline", "defaults")]
    assert any(command in reached for command in commands), \
        f"{dvc_yaml}, {stage}: stages/{stage}.py runs none of {commands}"
    missing = sorted(name for name in reached - NO_EFFECT_ON_OUTPUTS
                     if not any(found[name] == d or d in found[name].parents for d in deps))
    assert not missing, f"{dvc_yaml}, stage {stage}: add {missing} to its deps"


def judge_modules(stage: str, spec: dict, found: dict) -> list[str]:
    """evaluate imports the judge factory its params file names (evaluate.judge, "module:function") at
    run time: that module, where it is one of the repository's, is part of what the stage runs."""
    import re

    import yaml

    if stage != "evaluate":
        return []
    given = re.search(r"--params\s+(\S+)", spec["cmd"])
    params = given[1] if given else "params.yaml"
    if "${" in params:
        return []
    judge = ((yaml.safe_load((REPO / params).read_text()) or {}).get("evaluate") or {}).get("judge") or ""
    module = judge.partition(":")[0]
    return [module] if module in found else []


def test_the_registries_and_the_choices_derived_from_them():
    """Every extension point is one registry; the settings offer exactly what the registries hold, so
    adding a family, an adapter kind or a store format is its own module plus a registry line. The
    registries are read without torch (the configs read them for --help)."""
    import dataclasses
    import subprocess
    import sys

    from agd_pipeline import families
    from agd_pipeline.adapter_kinds import ADAPTER_KINDS, adapter_class
    from agd_pipeline.config import GenerateConfig, TrainConfig
    from agd_pipeline.store.formats import CODECS, FORMATS

    registries = {"families": [f.name for f in families.FAMILIES], "adapter kinds": list(ADAPTER_KINDS),
                  "store formats": list(FORMATS), "codecs": list(CODECS)}
    assert registries == {"families": ["dit", "sd", "sdxl", "sd3"],
                          "adapter kinds": ["bottleneck", "offset", "cross_attention"],
                          "store formats": ["zarr", "webdataset"], "codecs": list(CODECS)}, registries
    choices = {f.name: f.metadata["choices"] for cls in (GenerateConfig, TrainConfig) for f in dataclasses.fields(cls)}
    assert choices["adapter"] == tuple(ADAPTER_KINDS)
    placements = {p for family in families.FAMILIES for p in family.placements}
    assert choices["placement"] == ("auto", *sorted(placements))
    assert choices["format"] == tuple(FORMATS)
    assert choices["compressor"] == ("auto", *CODECS)
    for kind in ADAPTER_KINDS:  # each registry line names a class that builds and starts at zero
        import torch

        from agd_pipeline.adapters import AdapterConfig, Condition

        module = adapter_class(kind)(16, 8, AdapterConfig(kind=kind, width=4, embed_dim=6))
        cond = Condition(vector=torch.randn(2, 6), tokens=torch.randn(2, 3, 6))
        assert torch.equal(module(torch.randn(2, 5, 16), cond).expand(2, 5, 8), torch.zeros(2, 5, 8)), kind
    probe = ("import sys, agd_pipeline.config, agd_pipeline.families, agd_pipeline.adapter_kinds; "
             "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]", f"reading the registries imported {loaded.stdout.strip()}"


def test_benchmarks_live_outside_the_library():
    assert not list(PACKAGE.rglob("*benchmark*.py")), "measurement code belongs in benchmarks/"
    assert (REPO / "benchmarks" / "__init__.py").is_file()


def test_the_linter_is_clean():
    """ruff (a dev dependency, configured in pyproject.toml) over the whole repository."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
