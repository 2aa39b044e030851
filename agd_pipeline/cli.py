"""What every stage's command line shares: one option per config field (defaults from params.yaml),
clean one-line errors, exit codes, and the resolved config written next to the outputs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from pathlib import Path
from collections.abc import Callable

from .config import DEFAULT_PARAMS, StageConfig, load_config
from .devices import apply_thread_policy
from .errors import AgdError, os_reason
from .outputs import write_resolved  # noqa: F401 - the stages import it from here
# the one place Ctrl-C, SIGTERM and SIGHUP are handled (re-exported: commands import them from here)
from .interrupts import STOP_SIGNALS, Interrupted, interrupted_status, interruptible, signals_as_interrupts  # noqa: F401


# How the running command was started, as its help and messages show it: `python -m stages.<name>`
# in the repository (what dvc.yaml runs), `agd <name>` when the installed command started it.
_launcher = ["python -m stages.{}"]


def command_line(name: str) -> str:
    """The command ``name`` as the user typed it (``python -m stages.train`` or ``agd train``), for
    its usage line and its advice on what to re-run."""
    return _launcher[-1].format(name)


@contextlib.contextmanager
def launched_as(template: str):
    """Within the block, :func:`command_line` formats ``template`` (``"agd {}"``): set by the ``agd``
    dispatcher around the command it runs, and undone afterwards for in-process callers."""
    _launcher.append(template)
    try:
        yield
    finally:
        _launcher.pop()


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a bad command line as one ``error: ...`` line (exit 2), like every
    other input error, instead of its usage block."""
    def error(message: str):
        parser.exit(2, f"error: {message} (see `{parser.prog} --help`)\n")

    parser.error = error
    return parser


def os_error_line(err: OSError, path=None) -> str:
    """``error: <path>: <reason>`` for a file-system failure (permission, disk full, not a folder).
    ``path`` names the file when the error itself does not (a failed flush or close)."""
    reason = " ".join(str(os_reason(err)).split()) or type(err).__name__  # one line
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None) or path or ""
    return f"error: {where}: {reason}" if where else f"error: {reason}"


def out_of_memory(err: BaseException) -> bool:
    """An allocation failure (host or GPU), as opposed to a bug that happens to raise RuntimeError."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def memory_error_line(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"error: out of memory ({first[:200]}); lower the batch size or the model/adapter size, "
            "or use another device")


def run_command(body: Callable[[], int | None], check: Callable[[], str | None] | None = None,
                interrupted: str = "re-run the same command to go on") -> int:
    """Run a command: ``check`` says what is wrong with its arguments (or None), ``body`` does the
    work and may return an exit status. Bad arguments, input and file-system errors (AgdError,
    OSError) and running out of memory end in one ``error: ...`` line and exit status 2; any other
    exception is a bug and keeps its traceback. Ctrl-C, SIGTERM and SIGHUP end in one line saying
    ``interrupted`` (what to do next) and exit status 130, 143 or 129 (:func:`interruptible`)."""
    return interruptible(lambda: _run_checked(body, check), interrupted)


def _run_checked(body: Callable[[], int | None], check: Callable[[], str | None] | None) -> int:
    try:
        apply_thread_policy()  # every command: AGD_NUM_THREADS, else 1 (agd_pipeline.devices)
        problem = check() if check else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        return body() or 0
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:  # also a distributed scheduler that cannot be reached (TimeoutError)
        print(os_error_line(err), file=sys.stderr)
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(memory_error_line(err), file=sys.stderr)
    return 2


def stage_main(cls: type[StageConfig], run: Callable, argv=None, description: str | None = None,
               extend: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse options for ``cls`` and run ``run(config, args)`` through :func:`run_command`."""
    parser = one_line_errors(build_parser(cls, command_line(cls.section), description or cls.__doc__))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if extend:
        extend(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        config = config_from_args(cls, args)
        config.check_machine()  # e.g. --device cuda without a GPU: refused before anything loads
        run(config, args)

    return run_command(body, interrupted=f"re-run `{command_line(cls.section)}` with the same settings to resume")


def build_parser(cls: type[StageConfig], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per config field; defaults come from params.yaml."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every option defaults to the '{cls.section}' section of params.yaml, then to the "
        "built-in value shown. List options take comma- or space-separated values.",
    )
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file to read")
    defaults = cls()
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices:
            help_text += f" [{'|'.join(map(str, choices))}]"
        default = getattr(defaults, field.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        repeat = field.metadata.get("repeat", False)
        hint = typing.get_type_hints(cls)[field.name]
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            # an entry per use: prompts hold spaces and commas
            action="append" if repeat else "store",
            metavar=_metavar(typing.get_args(hint)[0] if repeat else hint, choices),
            help=f"{help_text} (built-in: {shown!r})",
        )
    return parser


def _metavar(hint, choices) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(hint) is list:
        return "LIST"
    return {int: "N", float: "X", bool: "BOOL"}.get(hint, "TEXT")


def config_from_args(cls: type[StageConfig], args: argparse.Namespace):
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):  # repeated numbers may also be comma-separated: 3,5 = 3 then 5
        value = overrides[field.name]
        if field.metadata.get("repeat") and value is not None and typing.get_args(
                typing.get_type_hints(cls)[field.name])[0] is not str:
            overrides[field.name] = " ".join(value)
    params = args.params if Path(args.params).exists() or args.params != DEFAULT_PARAMS else None
    return load_config(cls, params, overrides)

