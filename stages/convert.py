"""`python -m stages.convert` (what dvc.yaml runs): the command lives in agd_pipeline/commands/convert.py,
installed as `agd convert`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import convert as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
