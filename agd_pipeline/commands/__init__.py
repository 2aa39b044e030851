"""The pipeline's commands, one module each with a ``main(argv)``: installed as ``agd <command>``
(:mod:`agd_pipeline.commands.__main__`), and in the repository also run as ``python -m
stages.<command>`` (what dvc.yaml runs; stages/<command>.py hands over to the module here).

The repository's own tools (``stages.report``, ``stages.experiments``, ``stages.benchmark``) stay in
stages/: they write README blocks, drive DVC experiments and import benchmarks/, none of which an
installed library has. The recipes of the embedded defaults (``stages.base``, ``text_data``,
``text_base``, ``finetune``) live in defaults/commands/: a user's own model needs none of them."""

# in the order a run uses them: stage one, stage two, using the adapters, tools
COMMANDS = ("generate", "train", "sample", "evaluate", "inspect", "convert")
