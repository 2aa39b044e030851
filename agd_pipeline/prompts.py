"""The prompt files a text-to-image base folder may carry for evaluation (``evaluate`` reads them
when ``evaluate.prompts_file`` is empty): ``prompts/eval.tsv`` (the validation split's prompts),
``prompts/test.tsv`` (the test split's) and, for the negative-prompt check,
``prompts/negative_check.json`` and ``prompts/negative_check_test.json`` (``{"prompt": ..., "negatives":
{"<class>": "<negative prompt naming it>", ...}}``). A prompts file holds ``class<TAB>prompt`` lines
(the class a judge should see: accuracy is measured) or plain prompts (:func:`read_eval_prompts`)."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError

PROMPTS_DIR = "prompts"
EVAL_PROMPTS, NEGATIVE_CHECK = "eval.tsv", "negative_check.json"  # the validation split
TEST_PROMPTS, TEST_NEGATIVE_CHECK = "test.tsv", "negative_check_test.json"  # the test split


def read_eval_prompts(path: str | Path) -> tuple[list[str], list[int] | None]:
    """Evaluation prompts: ``digit<TAB>prompt`` lines (accuracy is measured) or plain prompts."""
    from .models import read_prompts

    lines = read_prompts(path)
    if all("\t" in line for line in lines):
        labels, prompts = zip(*(line.split("\t", 1) for line in lines))
        try:
            return [p.strip() for p in prompts], [int(label) for label in labels]
        except ValueError:
            raise ModelError(f"{path}: the text before each tab must be the digit the prompt asks for") from None
    return lines, None
