"""The repository's commands, each run as ``python -m stages.<name>`` (what dvc.yaml runs; see each
module's docstring). The library's commands live in agd_pipeline/commands/ (installed as ``agd
<name>``): stages/<name>.py hands over to them. report, experiments and benchmark are the
repository's own and are not installed."""

import sys

if sys.argv[:1] == ["-m"]:  # started as `python -m stages.X` (not imported by a test or another program)
    from agd_pipeline.interrupts import quiet_from_the_start, stop_with_dvc

    quiet_from_the_start()  # Ctrl-C, SIGTERM or SIGHUP while the command's imports load: one line too
    stop_with_dvc()  # under dvc repro: SIGTERM when dvc dies, SIGKILL included

# the embedded defaults' stage configs (base, text_data, text_base, finetune): registered with the
# library's settings, so that every stage's family guard knows the params files' recipe sections
import defaults.config  # noqa: E402,F401
