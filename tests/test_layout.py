"""The library's shape: no import cycles inside agd_pipeline/ (lazy imports inside functions
included), benchmarks outside it, and the linter clean."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "agd_pipeline"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, object]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


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
    """A stage's deps in dvc.yaml cover every agd_pipeline module its command imports (directly,
    lazily or through other modules), so a code change re-runs the stages it affects."""
    import yaml

    found = modules()
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
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    deps = [REPO / d for d in spec["deps"] if "${" not in d]
    assert REPO / "stages" / f"{stage}.py" in deps, f"{dvc_yaml}, {stage}: its own command is not a dependency"
    command = f"agd_pipeline.commands.{stage}"  # the module stages/<stage>.py hands over to (agd <stage>)
    assert command in reached, f"{dvc_yaml}, {stage}: stages/{stage}.py does not run {command}"
    missing = sorted(name for name in reached - NO_EFFECT_ON_OUTPUTS
                     if not any(found[name] == d or d in found[name].parents for d in deps))
    assert not missing, f"{dvc_yaml}, stage {stage}: add {missing} to its deps"


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
