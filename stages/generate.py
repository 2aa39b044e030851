"""Stage `generate` (stage one): record CFG-guided trajectories of the base into a sharded store."""

import sys

from agd_pipeline.cli import stage_main
from agd_pipeline.config import GenerateConfig, write_resolved


def run(config: GenerateConfig, args) -> None:
    from agd_pipeline.generation import generate

    generate(config, progress=not args.no_progress)
    write_resolved(config, config.out_dir)


def main(argv=None) -> int:
    return stage_main(GenerateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
