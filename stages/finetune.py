"""`python -m stages.finetune` (what dvc.yaml runs): the command lives in agd_pipeline/commands/finetune.py,
installed as `agd finetune`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import finetune as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
