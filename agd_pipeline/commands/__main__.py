"""``agd <command> [options]``: runs one of the pipeline's commands (``agd --help`` lists them,
``agd <command> --help`` shows its options). The console script ``agd`` of pyproject.toml calls
:func:`main`; ``python -m agd_pipeline.commands`` does the same."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import signal
import sys
import textwrap

from . import COMMANDS

SUMMARY_WIDTH = 100  # characters of a command's line in `agd --help`
USAGE = "usage: agd <command> [options]   (agd <command> --help: the command's options)"


def summary(name: str) -> str:
    """The first line of command ``name``'s docstring, read from its source without importing it
    (``agd --help`` stays instant and works whatever optional package is missing)."""
    spec = importlib.util.find_spec(f"{__package__}.{name}")
    with open(spec.origin, encoding="utf-8") as source:
        doc = ast.get_docstring(ast.parse(source.read())) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    stage = re.match(r"Stage `\w+`(?: \((.*?)\))?: (.*)", text)  # "Stage `generate` (stage one): record ..."
    if stage:
        text = stage[2][:1].upper() + stage[2][1:].rstrip(".") + (f" ({stage[1]})" if stage[1] else "")
    return textwrap.shorten(text.split(". ")[0].rstrip("."), SUMMARY_WIDTH, placeholder=" ...")


def help_text() -> str:
    """The usage line and one line per command."""
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
    lines += ["", "In the repository each is also `python -m stages.<command>` (what dvc.yaml runs)."]
    return "\n".join(lines)


def version() -> str:
    """The installed distribution's version (``agd --version``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("agd-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed: run from a clone)"


def main(argv: list[str] | None = None) -> int:
    """Run ``agd <command> [options]`` and return its exit status. Called without ``argv`` (the
    console script), it is the process's command: it reads sys.argv and, like ``python -m
    stages.<command>``, makes Ctrl-C, SIGTERM and SIGHUP end in one line from the start. Called with
    ``argv`` (a program or a test), it changes no process-wide state."""
    if argv is None:
        from agd_pipeline.interrupts import quiet_from_the_start, stop_with_dvc

        quiet_from_the_start()
        stop_with_dvc()  # under dvc repro: SIGTERM when dvc dies
        if hasattr(signal, "SIGPIPE"):  # `agd --help | head`: end quietly when the reader goes, as Unix tools do
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        argv = sys.argv[1:]
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"agd-pipeline {version()}")
        return 0
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: agd: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
              "(see `agd --help`)", file=sys.stderr)
        return 2
    from agd_pipeline.cli import launched_as

    command = importlib.import_module(f"{__package__}.{name}")
    with launched_as("agd {}"):
        return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
