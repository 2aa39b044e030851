"""`python -m stages.train` (what dvc.yaml runs): the command lives in agd_pipeline/commands/train.py,
installed as `agd train`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import train as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
