"""`python -m stages.base` (what dvc.yaml runs): the command lives in defaults/commands/base.py (an
embedded default's recipe: the repository's, not the installed library's). Imported, this module is
that one (tests patch its attributes)."""

import sys

from defaults.commands import base as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
