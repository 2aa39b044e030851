"""Stage `train` (stage two): train guidance adapters from the trajectory store alone."""

import sys

from agd_pipeline.cli import stage_main
from agd_pipeline.config import TrainConfig


def run(config: TrainConfig, args) -> None:
    from agd_pipeline.training import train  # imported here: --help stays fast

    train(config, progress=not args.no_progress)  # it records resolved_config.json in out_dir itself


def main(argv=None) -> int:
    return stage_main(TrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
