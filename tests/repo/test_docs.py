"""The documentation: README.md and the mkdocs site under docs/.

The site builds with `mkdocs build --strict` (no broken link or anchor), every snippet marked
`<!-- test: run -->` runs as written (on tiny random-init models, CPU), README stays short and names
the command for one's own model early, the generated blocks each live in exactly one file and are the
render of the tracked files, and no page names a date, a CPU model or a particular run's time ("N min N s",
"N h N min"): those belong in docs/records/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
RUN_MARKER = "<!-- test: run -->"
SNIPPET = re.compile(re.escape(RUN_MARKER) + r"\s*```(python|bash)\n(.*?)```", re.S)


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def snippets(path: Path) -> list[tuple[str, str]]:
    return SNIPPET.findall(path.read_text(encoding="utf-8"))


def test_readme_has_a_snippet_that_runs():
    assert [lang for lang, _ in snippets(README)] == ["python", "bash"]


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: p.relative_to(REPO).as_posix())
def test_marked_snippets_run(page, tmp_path):
    """A page's marked snippets run in order in one empty folder, as a reader would paste them."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "agd").exists() and any(lang == "bash" and "agd " in code for lang, code in snippets(page)):
        pytest.skip("the `agd` command is not installed next to this python")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "AGD_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    for i, (lang, code) in enumerate(snippets(page)):
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"snippet {i} ({lang}) of {page.name}:\n{code}\n{result.stdout}\n{result.stderr}"
    if page == README:
        assert (tmp_path / "tiny" / "adapters" / "adapters.safetensors").is_file()
        assert (tmp_path / "tiny" / "samples" / "grid.png").is_file()


def test_readme_is_short_and_names_the_command_for_ones_own_model():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    head = "\n".join(lines[:120])
    assert "agd generate --base-model" in head and "agd train --store" in head
    for command in ("make repro", "make test"):  # .ci/run runs `make test`
        assert re.search(rf"^{command}\b", "\n".join(lines), re.M), command


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the text outside fenced code, inline code and HTML comments."""
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out, fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append((number, re.sub(r"`[^`]*`", "", line)))
    return out


MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
DATED = re.compile(rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b(?:{MONTHS})(?: \d{{1,2}},?)? \d{{4}}\b"
                   rf"|\b\d{{1,2}} (?:{MONTHS}) \d{{4}}\b")
CPU = re.compile(r"\b(?:Xeon|EPYC|Zen ?\d?|Ryzen|Core i[3579])\b")


def test_no_page_names_a_date_or_a_cpu_model():
    """A particular day's run, its machine and its times go to docs/records/*.json; the prose links them."""
    found = [f"{page.relative_to(REPO)}:{number}: {line.strip()[:120]}" for page in PAGES
             for number, line in prose(page.read_text(encoding="utf-8")) if DATED.search(line) or CPU.search(line)]
    assert not found, "\n".join(found)


GENERATED = re.compile(r"<!-- ((?:results|variants)(?::[\w-]+)?):start -->.*?<!-- \1:end -->", re.S)
RUN_TIME = re.compile(r"\b\d+\s+min\s+\d+\s+s\b|\b\d+\s+h\s+\d+\s+min\b")


def outside_generated_blocks(text: str) -> str:
    """The text with every generated block's lines blanked (line numbers kept): the renderer owns those."""
    return GENERATED.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def test_no_page_names_a_particular_runs_time():
    """"N min N s" and "N h N min" are the times of a particular run: they go to docs/records/*.json with
    the machine and what shared it, and the prose gives a planning figure ("about 20 minutes on 2 cores")."""
    found = []
    for page in PAGES:
        lines = prose(outside_generated_blocks(page.read_text(encoding="utf-8")))
        text = "\n".join(line for _, line in lines)  # a time broken across two lines is found too
        for match in RUN_TIME.finditer(text):
            number = lines[text.count("\n", 0, match.start())][0]
            found.append(f"{page.relative_to(REPO)}:{number}: {match.group(0)!r}")
    assert not found, "\n".join(found)


def test_run_time_check_sees_prose_only():
    text = ("It took 19 min\n21 s here.\n```bash\nsleep  # 3 min 2 s\n```\n"
            "<!-- results:x:start -->\n| 1 h 2 min |\n<!-- results:x:end -->\nAbout 20 minutes; `4 min 5 s`.\n")
    lines = prose(outside_generated_blocks(text))
    joined = "\n".join(line for _, line in lines)
    assert RUN_TIME.findall(joined) == ["19 min\n21 s"]


def test_real_models_snippet_is_the_readme_one():
    """tests/test_pipelines.py runs README's snippet; the copy on the real-models page must be the same."""
    def snippet(path: Path, marker: str) -> str:
        found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
        assert found, f"{path.name} has no python block after {marker}"
        return found.group(1)

    page_marker = ("<!-- a copy of README.md's snippet: tests/test_pipelines.py runs README's copy, "
                   "tests/repo/test_docs.py checks this one equals it -->")
    assert snippet(REPO / "docs" / "real-models.md", page_marker) == snippet(
        README, "<!-- tested by tests/test_pipelines.py -->")


def test_records_are_json_with_what_ran():
    import json

    records = sorted((REPO / "docs" / "records").glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        assert {"what", "date", "machine"} <= set(record), path.name
        for entry in record.get("entries", []):
            assert {"section", "dates", "machines", "durations", "as_written"} <= set(entry), path.name


BLOCK = re.compile(r"<!-- (results(?::[\w-]+)?|variants(?::[\w-]+)?):start -->")


def test_every_generated_block_is_in_exactly_one_file():
    holders: dict[str, list[str]] = {}
    for page in PAGES:
        for name in BLOCK.findall(page.read_text(encoding="utf-8")):
            holders.setdefault(name, []).append(page.relative_to(REPO).as_posix())
    assert "results" in holders and "results:defaults" in holders and "variants" in holders
    several = {name: files for name, files in holders.items() if len(files) > 1}
    assert not several, several


def test_experiment_blocks_are_the_render_of_their_results():
    from experiments import EXPERIMENTS, readme_block
    from stages.report import ReportError, block_file, markers

    rendered = 0
    for name, experiment in EXPERIMENTS.items():
        start, end = markers(f"experiment-{name}")
        try:
            page = block_file(start, REPO)
        except ReportError:
            continue  # an experiment not (yet) reported in the docs
        text = page.read_text(encoding="utf-8")
        committed = text[text.index(start):text.index(end) + len(end)]
        folder = Path("docs/experiments") / name
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            expected = readme_block(experiment, folder, page.parent)
        finally:
            os.chdir(cwd)
        assert committed == expected, f"{page.name}: block experiment-{name} is not the render of {folder}"
        rendered += 1
    assert rendered >= 14


def test_defaults_block_is_the_render_of_the_committed_metrics():
    result = subprocess.run([sys.executable, "-m", "stages.report", "--defaults", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "README.md" in result.stdout


def test_a_block_is_found_in_the_one_file_that_holds_it(tmp_path):
    from stages.report import ReportError, block_file

    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "README.md").write_text("intro\n")
    (tmp_path / "docs" / "sub" / "page.md").write_text("<!-- results:x:start -->\n<!-- results:x:end -->\n")
    assert block_file("<!-- results:x:start -->", tmp_path) == tmp_path / "docs" / "sub" / "page.md"
    with pytest.raises(ReportError, match="no markdown file holds"):
        block_file("<!-- results:y:start -->", tmp_path)
    (tmp_path / "README.md").write_text("<!-- results:x:start -->\n<!-- results:x:end -->\n")
    with pytest.raises(ReportError, match="is in 2 files"):
        block_file("<!-- results:x:start -->", tmp_path)
