"""`python -m stages.text_data` (what dvc.yaml runs): the command lives in agd_pipeline/commands/text_data.py,
installed as `agd text_data`. Imported, this module is that one (tests patch its attributes)."""

import sys

from agd_pipeline.commands import text_data as command

if __name__ == "__main__":
    sys.exit(command.main())
sys.modules[__name__] = command
