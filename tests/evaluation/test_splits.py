"""The text defaults' test split of prompts: phrasings that neither a base, stage one nor a validation run saw,
in words the tokenizers already have, with the validation files left as they were."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from defaults import textdigits
from agd_pipeline.errors import ModelError

# 6 training and 5 held-out images of each digit; held-out image i shows digit i % 10 at stroke weight (i // 10) % 3
TRAIN_LABELS, TRAIN_WEIGHTS = np.arange(60) % 10, (np.arange(60) // 10) % 3
HOLD_LABELS, HOLD_WEIGHTS = np.arange(50) % 10, (np.arange(50) // 10) % 3
PER_DIGIT = 4

# sha256 of the validation files for write_files(seed=5), from write_prompt_files as it was before the test split
# (git 082a580): the split must draw from its own random stream and leave these byte for byte.
VALIDATION_SHA256 = {
    textdigits.TRAIN_PROMPTS: "3f8dd6b9626306aeb740a2cb8165758bacf18066b44d3685ff4f4f5d4ac87168",
    textdigits.EVAL_PROMPTS: "17070aca3897c9524515c1742e7f86b51aa3840de3a3757be064f8f8037398fc",
    textdigits.NEGATIVE_PROMPTS: "844f8d59d033f9ad17913bae629898cfdafc536b3056e668d0ac82ea97ca4be7",
    textdigits.NEGATIVE_CHECK: "23e89c3ada9e5b83d81ff6a04f1052a731a938d2e8414c5ea42b15cdf7e17af2",
}
VALIDATION_TRAIN_IMAGES = [4, 33, 27, 31, 43, 21, 38, 16, 26, 23, 15, 14, 22, 20, 36, 12, 7, 34, 56, 39, 40, 58, 17,
                           32, 0, 1, 37, 51, 11, 57, 5, 10, 49, 25, 44, 35, 55, 45, 46, 47]
# the tokenizers' words when the trained bases were built: the test split must not add one
TOKENIZER_WORDS = ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'background', 'bold', 'by', 'dark', 'digit',
                   'drawn', 'eight', 'five', 'four', 'hand', 'handwritten', 'in', 'nine', 'number', 'of', 'on', 'one',
                   'picture', 'seven', 'six', 'some', 'strokes', 'the', 'thin', 'three', 'two', 'written', 'zero']


def write_files(folder, seed=5):
    config = SimpleNamespace(seed=seed, generate_prompts=40, eval_prompts_per_digit=PER_DIGIT, agnostic_share=0.2)
    return textdigits.write_prompt_files(folder, TRAIN_LABELS, TRAIN_WEIGHTS, HOLD_LABELS, HOLD_WEIGHTS, config)


def split_texts(folder) -> list[str]:
    prompts, _ = textdigits.read_eval_prompts(folder / textdigits.TEST_PROMPTS)
    check = json.loads((folder / textdigits.TEST_NEGATIVE_CHECK).read_text())
    return prompts + [check["prompt"], *check["negatives"].values()]


def test_test_split_shares_no_prompt_with_training_or_validation(tmp_path):
    write_files(tmp_path)
    overlap = textdigits.prompt_overlap(tmp_path)
    assert overlap["test_prompts"] == 10 * PER_DIGIT and overlap["test_check_texts"] == 11
    assert overlap["distinct_test_prompts"] == overlap["test_prompts"]
    assert {k: v for k, v in overlap.items() if "_in_" in k} == dict.fromkeys(
        [f"test_{kind}_in_{source}" for source in ("training_captions", "stage_one_prompts", "negative_prompts",
                                                   "validation") for kind in ("prompts", "check_texts")]
        + ["test_templates_in_training"], 0)


def test_prompt_overlap_counts_what_leaks(tmp_path, monkeypatch):
    write_files(tmp_path)
    validation = (tmp_path / textdigits.EVAL_PROMPTS).read_text().splitlines()[0]
    with (tmp_path / textdigits.TEST_PROMPTS).open("a") as f:
        f.write(f"{validation} \n")  # verbatim after strip
    overlap = textdigits.prompt_overlap(tmp_path)
    assert overlap["test_prompts_in_validation"] == 1 and overlap["test_prompts_in_training_captions"] == 1
    # a training template among the test ones is reported, even where no drawn prompt happened to use it
    monkeypatch.setattr(textdigits, "TEST_TEMPLATES", textdigits.TEST_TEMPLATES + ("a {w}{d}",))
    assert textdigits.prompt_overlap(tmp_path)["test_templates_in_training"] == 1


def test_test_prompts_hold_only_tokenizer_words(tmp_path):
    write_files(tmp_path)
    assert textdigits.vocabulary() == TOKENIZER_WORDS
    texts = split_texts(tmp_path)
    assert {word for text in texts for word in text.split()} <= set(TOKENIZER_WORDS)
    tokenizer = textdigits.make_word_tokenizer(tmp_path / "tokenizer", textdigits.vocabulary())
    for text in texts:  # one token a word, between start and end
        assert len(tokenizer(text).input_ids) == len(text.split()) + 2, text


def test_validation_files_are_unchanged_by_the_test_split(tmp_path):
    images = write_files(tmp_path)
    assert images.tolist() == VALIDATION_TRAIN_IMAGES
    for name, digest in VALIDATION_SHA256.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name
    # and the test split is a function of the seed too
    write_files(tmp_path / "again")
    write_files(tmp_path / "other", seed=6)
    for name in (textdigits.TEST_PROMPTS, textdigits.TEST_NEGATIVE_CHECK):
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    test_prompts = textdigits.TEST_PROMPTS
    assert (tmp_path / test_prompts).read_bytes() != (tmp_path / "other" / test_prompts).read_bytes()


def test_test_prompts_name_the_digit_of_their_held_out_image(tmp_path):
    write_files(tmp_path)
    prompts, labels = textdigits.read_eval_prompts(tmp_path / textdigits.TEST_PROMPTS)
    _, eval_labels = textdigits.read_eval_prompts(tmp_path / textdigits.EVAL_PROMPTS)
    assert labels == eval_labels  # as many per digit as eval.tsv, in the same order
    # the same held-out images eval.tsv captions: the first PER_DIGIT of each digit
    images = [i for d in range(10) for i in np.flatnonzero(HOLD_LABELS == d)[:PER_DIGIT]]
    names = {d: {textdigits.DIGIT_WORDS[d], str(d)} for d in range(10)}
    for prompt, label, image in zip(prompts, labels, images):
        words = set(prompt.split())
        assert label == HOLD_LABELS[image]
        assert {d for d in range(10) if words & names[d]} == {label}, prompt
        assert words & {"thin", "bold"} <= {textdigits.WEIGHTS[HOLD_WEIGHTS[image]]}, prompt
    check = json.loads((tmp_path / textdigits.TEST_NEGATIVE_CHECK).read_text())
    assert set(check) == {"prompt", "negatives"} and list(check["negatives"]) == [str(d) for d in range(10)]
    assert not {d for d in range(10) if set(check["prompt"].split()) & names[d]}
    for digit, negative in check["negatives"].items():
        assert {d for d in range(10) if set(negative.split()) & names[d]} == {int(digit)}, negative


def test_held_out_caption_skips_seen_phrasings_and_prefers_unused_ones():
    every = {t.format(d=name, w="bold ") for t in textdigits.TEST_DIGIT_TEMPLATES for name in ("three", "3")}
    left = "the bold 3"
    rng = np.random.default_rng(0)
    assert textdigits.held_out_caption(rng, 3, 2, seen=every - {left}, used=set()) == left
    assert textdigits.held_out_caption(rng, 3, 2, seen=every - {left}, used={left}) == left  # a repeat, not a leak
    two_left = every - {left, "digit 3"}
    assert textdigits.held_out_caption(rng, 3, 2, seen=two_left, used={left}) == "digit 3"
    with pytest.raises(ModelError, match="TEST_DIGIT_TEMPLATES"):
        textdigits.held_out_caption(rng, 3, 2, seen=every, used=set())
