"""`python -m stages.text_base` (what dvc.yaml runs): the command lives in agd_pipeline/commands/text_base.py,
installed as `agd text_base`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import text_base as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
