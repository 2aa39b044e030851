"""Stage `evaluate`: CFG (2 evaluations per step) against AGD (1 per step) on the same seeds."""

import sys

from agd_pipeline.cli import stage_main, write_resolved
from agd_pipeline.config import EvaluateConfig


def run(config: EvaluateConfig, args) -> None:
    from agd_pipeline.adapters import read_adapter_config
    from agd_pipeline.evaluation import check_extras, evaluate  # imported here: --help stays fast
    from agd_pipeline.outputs import owned_output

    check_extras()  # a missing [eval] package is named before anything is read or written
    inputs = [config.adapters, config.base_model or read_adapter_config(config.adapters)["base_model"]["id"]]
    with owned_output(config, inputs, ours=lambda folder: (folder / "metrics.json").is_file()):
        evaluate(config, progress=not args.no_progress)
        write_resolved(config, config.out_dir)


def main(argv=None) -> int:
    return stage_main(EvaluateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
