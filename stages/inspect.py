"""`python -m stages.inspect` (what dvc.yaml runs): the command lives in agd_pipeline/commands/inspect.py,
installed as `agd inspect`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import inspect as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
