"""The embedded defaults' recipes as commands, one module each with a ``main(argv)`` (the shape of
:mod:`agd_pipeline.commands`): ``python -m stages.<command>`` runs them (what dvc.yaml runs). They
are the repository's, not the installed library's: ``agd`` does not list them."""

COMMANDS = ("base", "text_data", "text_base", "finetune")
