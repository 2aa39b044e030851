"""`python -m stages.evaluate` (what dvc.yaml runs): the command lives in agd_pipeline/commands/evaluate.py,
installed as `agd evaluate`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import evaluate as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
