"""`python -m stages.sample` (what dvc.yaml runs): the command lives in agd_pipeline/commands/sample.py,
installed as `agd sample`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import sample as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
