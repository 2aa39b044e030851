"""`python -m stages.generate` (what dvc.yaml runs): the command lives in agd_pipeline/commands/generate.py,
installed as `agd generate`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import generate as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
