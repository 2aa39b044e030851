"""Stage `generate` (stage one): record CFG-guided trajectories of the base into a sharded store."""

import sys

from agd_pipeline.cli import library_stage
from agd_pipeline.config import GenerateConfig


def main(argv=None) -> int:
    return library_stage(GenerateConfig, "agd_pipeline.generation:generate", argv)


if __name__ == "__main__":
    sys.exit(main())
