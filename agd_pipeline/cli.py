"""What every stage's command line shares: options from the config, clean errors, exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from .config import StageConfig, build_parser, config_from_args, write_resolved
from .errors import AgdError


def stage_main(cls: type[StageConfig], run: Callable, argv=None, description: str | None = None,
               extend: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse options for ``cls``, run ``run(config, args)``, turn AgdError into a one-line message."""
    parser = build_parser(cls, f"python -m stages.{cls.section}", description or cls.__doc__)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if extend:
        extend(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(cls, args)
        run(config, args)
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: re-run `python -m stages.{cls.section}` with the same settings to resume",
              file=sys.stderr)
        return 130
    return 0


def library_stage(cls: type[StageConfig], target: str, argv=None) -> int:
    """A stage that calls ``module:function(config, progress=...)`` and records its resolved config.

    The library module is imported only after the options parse, so ``--help`` stays fast.
    """
    def run(config: StageConfig, args: argparse.Namespace) -> None:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(config, progress=not args.no_progress)
        write_resolved(config, config.out_dir)

    return stage_main(cls, run, argv)
