"""Stage `text_data`: what the embedded text-to-image defaults share: a small VAE, the evaluation
classifier, the captioned digits and the prompt sets (training, evaluation, negative prompts)."""

import sys

from agd_pipeline.cli import stage_main, write_resolved
from defaults.config import TextDataConfig


def run(config: TextDataConfig, args) -> None:
    from agd_pipeline.outputs import owned_output
    from defaults.textdigits import prepare_shared

    with owned_output(config):
        result = prepare_shared(config, progress=not args.no_progress)
        write_resolved(config, config.out_dir)
    print(f"{config.out_dir}: VAE reconstruction MSE {result['vae_reconstruction_mse']:.4f} (images in [-1, 1]), "
          f"evaluation classifier held-out accuracy {result['classifier_holdout_accuracy']:.3f}")


def main(argv=None) -> int:
    return stage_main(TextDataConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
