"""Stage `generate` (stage one): record CFG-guided trajectories of the base into a sharded store."""

import sys

from agd_pipeline.cli import stage_main
from agd_pipeline.config import GenerateConfig


def run(config: GenerateConfig, args) -> None:
    # no resolved_config.json inside the store: its manifest.json records the settings, and a
    # rewritten file would change the tracked output on every re-run
    if args.rebuild_manifest:
        from agd_pipeline.generation import rebuild_manifest

        rebuild_manifest(config.out_dir)
        return
    from agd_pipeline.generation import generate

    generate(config, progress=not args.no_progress)


def extend(parser) -> None:
    parser.add_argument("--rebuild-manifest", action="store_true",
                        help="rebuild a lost or damaged manifest.json of --out-dir from the shards' own metadata "
                        "(each shard carries its run's settings and checksums, and is re-read against them); "
                        "samples nothing. A normal run does this by itself when its settings match the shards")


def main(argv=None) -> int:
    return stage_main(GenerateConfig, run, argv, extend=extend)


if __name__ == "__main__":
    sys.exit(main())
