"""Stage `base`: train the embedded default base model (class-conditional DiT on 8x8 digits)."""

import sys

from agd_pipeline.cli import stage_main, write_resolved
from defaults.config import BaseStageConfig


def run(config: BaseStageConfig, args) -> None:
    from agd_pipeline.outputs import owned_output
    from defaults.toy import train_base

    with owned_output(config):
        result = train_base(config, progress=not args.no_progress)
        write_resolved(config, config.out_dir)
    print(f"{config.out_dir}: DiT with {result['parameters']:,} parameters, final loss "
          f"{result['final_loss']:.4f}; evaluation classifier held-out accuracy "
          f"{result['classifier_holdout_accuracy']:.3f}")


def main(argv=None) -> int:
    return stage_main(BaseStageConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
