"""Stage `train` (stage two): train guidance adapters from the trajectory store alone."""

import sys

from agd_pipeline.cli import stage_main, write_resolved
from agd_pipeline.config import TrainConfig


def run(config: TrainConfig, args) -> None:
    from agd_pipeline.training import train  # imported here: --help stays fast

    train(config, progress=not args.no_progress)
    write_resolved(config, config.out_dir)


def main(argv=None) -> int:
    return stage_main(TrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
