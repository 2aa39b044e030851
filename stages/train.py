"""Stage `train` (stage two): train guidance adapters from the trajectory store alone."""

import sys

from agd_pipeline.cli import library_stage
from agd_pipeline.config import TrainConfig


def main(argv=None) -> int:
    return library_stage(TrainConfig, "agd_pipeline.training:train", argv)


if __name__ == "__main__":
    sys.exit(main())
