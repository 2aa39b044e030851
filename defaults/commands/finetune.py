"""Stage `finetune`: a fine-tuned derivative of the embedded default (full fine-tune or a merged LoRA)
on a shifted distribution (its boldest or thinnest digits), for the fine-tuned-derivatives experiment."""

import sys

from agd_pipeline.cli import stage_main, write_resolved
from defaults.config import FinetuneConfig


def run(config: FinetuneConfig, args) -> None:
    from pathlib import Path

    from defaults.finetune import finetune
    from agd_pipeline.outputs import replacing_output

    with replacing_output(Path(config.out_dir), config.key("out_dir"), "stages.finetune", [config.base_model]):
        result = finetune(config, progress=not args.no_progress)
        write_resolved(config, config.out_dir)
    print(f"{config.out_dir}: {result['description']}; {result['trained_parameters']:,} parameters trained on "
          f"{result['training_images']} images, final loss {result['final_loss']:.4f}")


def main(argv=None) -> int:
    return stage_main(FinetuneConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
