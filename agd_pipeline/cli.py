"""What every stage's command line shares: options from the config, clean errors, exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import StageConfig, build_parser, config_from_args
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
