"""What every stage's command line shares: one option per config field (defaults from params.yaml,
shown by --help as the values that will apply), the settings block each stage prints before it
starts (:mod:`agd_pipeline.settings`), clean one-line errors, exit codes, and the resolved config
written next to the outputs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from collections.abc import Callable

from . import settings
from .config import DEFAULT_PARAMS, StageConfig, coerce_value, load_config, params_section, read_params
from .devices import apply_thread_policy
# command_line names a command as the user started it (every message and usage line uses it)
from .errors import AgdError, command_line, launched_as, os_reason  # noqa: F401 - launched_as re-exported
from .outputs import write_resolved  # noqa: F401 - the stages import it from here
# the one place Ctrl-C, SIGTERM and SIGHUP are handled (re-exported: commands import them from here)
from .interrupts import STOP_SIGNALS, Interrupted, interrupted_status, interruptible, signals_as_interrupts  # noqa: F401


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
    """Parse options for ``cls`` and run ``run(config, args)`` through :func:`run_command`. Before
    ``run``, a base of another family than the params file's own pipeline is refused while the output
    folder is still that pipeline's (:func:`agd_pipeline.settings.check_family`), and the settings
    that are not the built-in ones are printed once, each with where it comes from."""
    parser = one_line_errors(build_parser(cls, command_line(cls.section), description or cls.__doc__,
                                          params=params_argument(argv)))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if extend:
        extend(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        resolved = resolve_config(cls, args)
        config = resolved.config
        config.check_machine()  # e.g. --device cuda without a GPU: refused before anything loads
        settings.warn(settings.check_family(config, resolved.sources, resolved.params, resolved.label))
        settings.announce(config, resolved.sources, resolved.note)
        run(config, args)

    return run_command(body, interrupted=f"re-run `{command_line(cls.section)}` with the same settings to resume")


def params_argument(argv=None) -> str:
    """The params file a command line names (``--params``), else params.yaml: read before the full
    parse, so that --help can show the values that file sets."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--params", default=DEFAULT_PARAMS)
    pre.error = lambda message: None  # a malformed --params is the full parse's to report, in one line
    try:
        known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    except argparse.ArgumentError:
        return DEFAULT_PARAMS
    return known.params or DEFAULT_PARAMS


def _uses_file(params: str) -> bool:
    """Whether a stage reads ``params``: a named file always (a missing one is an error), the default
    params.yaml only where it exists (a stage run outside the repository takes the built-in values)."""
    return Path(params).exists() or params != DEFAULT_PARAMS


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, wrapping only at spaces: a line never ends inside "built-in" or
    "cross_attention+output" (textwrap breaks words at hyphens by default)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser(cls: type[StageConfig], prog: str, description: str,
                 params: str | None = DEFAULT_PARAMS) -> argparse.ArgumentParser:
    """An argparse parser with one option per config field. Each option's help shows the value that
    applies without it and where that comes from: the ``params`` file's section, else the built-in
    value. The parser's own defaults stay None, so that a given option is told from a default one."""
    section, note = _help_section(cls, params)
    label = settings.section_label(params, cls.section)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
        epilog=f"{note}. Each option shows the value that applies without it (applies: ...) and where it comes "
        "from; a stage prints the values that are not the built-in ones before it starts. List options take "
        "comma- or space-separated values.".replace("%", "%%"),
    )
    parser.add_argument("--params", default=DEFAULT_PARAMS,
                        help=f"params file to read (default: {DEFAULT_PARAMS} in the current folder, if there)")
    defaults = cls()
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices:
            help_text += f" [{'|'.join(map(str, choices))}]"
        bounds = field.metadata.get("bounds")
        if bounds is not None:
            help_text += f" (allowed: {bounds})"
        built_in = settings.show(getattr(defaults, field.name))
        if field.name in section:
            try:
                value = settings.show(coerce_value(cls, field, section[field.name]))
            except AgdError:  # shown as written; the run itself reports what is wrong with it
                value = settings.show(section[field.name])
            applies = f"applies: {value} from {label}" + (f"; built-in: {built_in}" if value != built_in else "")
        else:
            applies = f"applies: {built_in}, built-in"
        repeat = field.metadata.get("repeat", False)
        hint = typing.get_type_hints(cls)[field.name]
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            # an entry per use: prompts hold spaces and commas
            action="append" if repeat else "store",
            metavar=_metavar(typing.get_args(hint)[0] if repeat else hint, choices),
            help=f"{help_text} ({applies})".replace("%", "%%"),  # argparse %-formats help texts
        )
    return parser


def _help_section(cls: type[StageConfig], params: str | None) -> tuple[dict, str]:
    """The section --help shows values from, and a sentence on where they come from (for the epilog)."""
    if params is None:
        return {}, "No params file is read: the built-in values apply"
    if not _uses_file(params):
        return {}, (f"No {params} in this folder: the built-in values apply (run from the repository root, or "
                    "pass --params)")
    try:
        section = params_section(cls, read_params(params))
    except AgdError as err:
        return {}, f"{params} cannot be read ({err}): the values below are the built-in ones"
    if not section:
        return {}, f"{params} has no [{cls.section}] section: the built-in values apply"
    return section, f"Options default to the [{cls.section}] section of {params}, then to the built-in values"


def _metavar(hint, choices) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(hint) is list:
        return "LIST"
    return {int: "N", float: "X", bool: "BOOL"}.get(hint, "TEXT")


@dataclasses.dataclass
class Resolved:
    """A stage's config and where its values come from (for the settings block and the family guard)."""

    config: StageConfig
    sources: dict[str, str]  # field -> "built-in", "params.yaml [generate]" or "--base-model"
    params: dict | None  # the whole params file, None when none is read
    label: str  # how the params file's section is named: "params.yaml [generate]"
    note: str  # the settings block's header: which params file applied


def resolve_config(cls: type[StageConfig], args: argparse.Namespace) -> Resolved:
    """The validated config from the params file named by ``args.params`` (params.yaml only where it
    exists) and the options given, with each field's source."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):  # repeated numbers may also be comma-separated: 3,5 = 3 then 5
        value = overrides[field.name]
        if field.metadata.get("repeat") and value is not None and typing.get_args(
                typing.get_type_hints(cls)[field.name])[0] is not str:
            overrides[field.name] = " ".join(value)
    params = read_params(args.params) if _uses_file(args.params) else None
    section = params_section(cls, params) if params is not None else {}
    config = load_config(cls, section, overrides)
    label = settings.section_label(args.params, cls.section)
    if params is None:
        note = f"no {args.params} in this folder"
    elif not section:
        note = f"{args.params} has no [{cls.section}] section"
    else:
        note = f"params: {label}"
    sources = settings.value_sources(cls, section, overrides, label if params is not None else None)
    return Resolved(config, sources, params, label, note)


def config_from_args(cls: type[StageConfig], args: argparse.Namespace):
    """The validated config of a parsed command line (see :func:`resolve_config`)."""
    return resolve_config(cls, args).config
