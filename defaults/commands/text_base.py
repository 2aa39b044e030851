"""Stage `text_base`: train one embedded text-to-image default (a tiny SD, SDXL or SD3 pipeline on
captioned digits) and write it as a diffusers pipeline folder."""

import sys

from agd_pipeline.cli import stage_main, write_resolved
from defaults.config import TextBaseConfig


def run(config: TextBaseConfig, args) -> None:
    from pathlib import Path

    from agd_pipeline.outputs import replacing_output
    from defaults.textdigits import train_family_base

    with replacing_output(Path(config.out_dir), config.key("out_dir"), "stages.text_base", [config.shared]):
        result = train_family_base(config.family, config, progress=not args.no_progress)
        write_resolved(config, config.out_dir)
    print(f"{config.out_dir}: {config.family} pipeline, denoiser with {result['parameters']:,} parameters, final "
          f"loss {result['final_loss']:.4f}, trained on {result['captions']:,} captions")


def main(argv=None) -> int:
    return stage_main(TextBaseConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
