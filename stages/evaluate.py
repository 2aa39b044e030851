"""Stage `evaluate`: CFG (2 evaluations per step) against AGD (1 per step) on the same seeds."""

import sys

from agd_pipeline.cli import library_stage
from agd_pipeline.config import EvaluateConfig


def main(argv=None) -> int:
    return library_stage(EvaluateConfig, "agd_pipeline.evaluation:evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
