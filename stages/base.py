"""`python -m stages.base` (what dvc.yaml runs): the command lives in agd_pipeline/commands/base.py,
installed as `agd base`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import base as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
