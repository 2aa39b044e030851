"""The embedded text-to-image defaults (SD, SDXL, SD3 trained on captioned digits) and the text
evaluation: captions, tokenizer, shared data, each family's pipeline end to end from the command line
in tiny form, and the evaluation's accuracy and FID against known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defaults import textdigits
from defaults.config import TextBaseConfig, TextDataConfig
from conftest import EMBEDDED_JUDGE, run_main

TINY_DATA = ["--vae-steps", "4", "--vae-channels", "8", "--vae-batch-size", "8", "--classifier-steps", "5",
             "--generate-prompts", "24", "--eval-prompts-per-digit", "1"]
TINY_BASE = ["--channels", "8", "--head-dim", "4", "--num-layers", "1", "--text-hidden", "8", "--train-steps", "3",
             "--batch-size", "8", "--captions-per-image", "1"]


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "shared"
    _ok(run_main("stages.text_data", "--params", "pipelines/text/shared.yaml", "--out-dir", out, "--no-progress",
                *TINY_DATA))
    return out


# ------------------------------------------------------------------------------------ captions


def test_stroke_weights_split_each_digit_into_thirds():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (90, 1, 8, 8)).astype(np.float32)
    labels = np.repeat(np.arange(3), 30)
    weights = textdigits.stroke_weights(images, labels)
    ink = (images + 1).reshape(90, -1).sum(1)
    for digit in range(3):
        mask = labels == digit
        assert np.bincount(weights[mask], minlength=3).tolist() == [10, 10, 10]
        # every "bold" image of a digit has more ink than every "thin" one
        assert ink[mask & (weights == 2)].min() > ink[mask & (weights == 0)].max()


def test_captions_name_the_digit_and_its_weight():
    rng = np.random.default_rng(1)
    for _ in range(200):
        digit, weight = int(rng.integers(10)), int(rng.integers(3))
        text = textdigits.caption(rng, digit, weight)
        assert textdigits.DIGIT_WORDS[digit] in text.split() or str(digit) in text.split(), text
        assert all(w not in text.split() for w in ("thin", "bold") if w != textdigits.WEIGHTS[weight])
        agnostic = textdigits.caption(rng, digit, weight, agnostic=True)
        assert not {*textdigits.DIGIT_WORDS, *map(str, range(10))} & set(agnostic.split()), agnostic


def test_caption_set_is_a_function_of_the_seed():
    labels, weights = np.arange(10), np.ones(10, dtype=int)
    first = textdigits.caption_set(labels, weights, seed=3, per_image=2, agnostic_share=0.2)
    again = textdigits.caption_set(labels, weights, seed=3, per_image=2, agnostic_share=0.2)
    other = textdigits.caption_set(labels, weights, seed=4, per_image=2, agnostic_share=0.2)
    assert first[0] == again[0] and first[1].tolist() == [i for i in range(10) for _ in range(2)]
    assert first[0] != other[0]


def test_word_tokenizer_makes_each_word_one_token(tmp_path):
    words = textdigits.vocabulary()
    tokenizer = textdigits.make_word_tokenizer(tmp_path, words)
    for word in words:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))  # start, the word, end
    # a word outside the vocabulary still encodes (in pieces), without unknown tokens
    ids = tokenizer("zebra").input_ids
    assert len(ids) > 3 and tokenizer.decode(ids, skip_special_tokens=True).strip() == "zebra"
    longest = max(textdigits.DIGIT_TEMPLATES, key=len).format(d="seven", w="bold ")
    assert len(tokenizer(longest).input_ids) <= textdigits.MAX_TOKENS


def test_eval_prompt_files_parse_with_and_without_digits(tmp_path):
    labelled = tmp_path / "eval.tsv"
    labelled.write_text("3\ta bold three\n7\tnumber 7\n")
    assert textdigits.read_eval_prompts(labelled) == (["a bold three", "number 7"], [3, 7])
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\n\na dog\n")
    assert textdigits.read_eval_prompts(plain) == (["a cat", "a dog"], None)
    bad = tmp_path / "bad.tsv"
    bad.write_text("three\ta bold three\n")
    with pytest.raises(Exception, match="digit the prompt asks for"):
        textdigits.read_eval_prompts(bad)


def test_config_checks_name_the_key():
    from agd_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="text_base.head_dim"):
        TextBaseConfig(channels=16, head_dim=5).check()
    with pytest.raises(ConfigError, match="text_base.caption_dropout"):
        TextBaseConfig(caption_dropout=0.0).check()
    with pytest.raises(ConfigError, match="text_data.vae_channels"):
        TextDataConfig(vae_channels=12).check()


# ------------------------------------------------------------------------ shared data and bases


def test_shared_data_holds_what_the_families_need(shared_dir):
    data = np.load(shared_dir / "digits.npz")
    assert data["x_train"].shape[1:] == (1, 16, 16) and -1 <= data["x_train"].min() < data["x_train"].max() <= 1
    prompts = (shared_dir / "prompts" / "eval.tsv").read_text().splitlines()
    assert len(prompts) == 10 and sorted(int(line.split("\t")[0]) for line in prompts) == list(range(10))
    check = json.loads((shared_dir / "prompts" / "negative_check.json").read_text())
    assert set(check["negatives"]) == {str(d) for d in range(10)}
    train = (shared_dir / "prompts" / "train.txt").read_text().splitlines()
    assert len(train) == 24
    # each training prompt captions a training image: a prompt that names a digit names that image's
    images = data["train_prompt_images"]
    assert len(images) == 24 and images.min() >= 0 and images.max() < len(data["y_train"])
    numbers = {**{word: d for d, word in enumerate(textdigits.DIGIT_WORDS)}, **{str(d): d for d in range(10)}}
    named = [(next((numbers[w] for w in text.split() if w in numbers), None), data["y_train"][i])
             for text, i in zip(train, images)]
    assert all(digit == label for digit, label in named if digit is not None)
    assert sum(digit is not None for digit, _ in named) >= 12


@pytest.mark.bad_input
def test_text_base_refuses_a_folder_that_is_not_shared_data(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_main("stages.text_base", "--params", "pipelines/text/sd.yaml", "--shared", tmp_path / "empty",
                     "--out-dir", tmp_path / "base", "--no-progress", *TINY_BASE)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a text_data output" in result.stderr and "stages.text_data" in \
        result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_tiny_text_default_runs_generate_train_evaluate(shared_dir, tmp_path, family):
    """The text pipeline of pipelines/text/dvc.yaml in tiny form: text_base -> generate -> train ->
    evaluate from the command line, then the base loads as the family's own diffusers pipeline."""
    base, store, adapters, evaluation = (tmp_path / name for name in ("base", "store", "adapters", "eval"))
    params = Path("pipelines/text") / f"{family}.yaml"
    _ok(run_main("stages.text_base", "--params", params, "--shared", shared_dir, "--out-dir", base, "--no-progress",
                *TINY_BASE))
    _ok(run_main("stages.generate", "--params", params, "--base-model", base, "--out-dir", store,
                "--prompts-file", base / "prompts/train.txt", "--negative-prompts-file", base / "prompts/negatives.txt",
                "--num-steps", "3", "--batch-size", "12", "--shard-size", "12",
                "--no-progress"))
    _ok(run_main("stages.train", "--params", params, "--store", store, "--out-dir", adapters, "--steps", "3",
                "--batch-size", "8", "--checkpoint-every", "0", "--no-progress"))
    result = _ok(run_main("stages.evaluate", "--params", params, "--adapters", adapters, "--out-dir", evaluation,
                         "--guidance-scales", "2", "--batch-size", "10", "--negative-check-samples", "1",
                         "--samples-per-class", "1", "--no-progress"))
    assert "negative-prompt check" in result.stdout
    # the ablation's data: the training prompts' own images, noised (train.npz, written by text_base)
    pairs = np.load(base / "train.npz")
    assert pairs["captions"].tolist() == (base / "prompts/train.txt").read_text().splitlines()
    assert pairs["latents"].shape == (24, 4, 8, 8)
    _ok(run_main("stages.generate", "--params", params, "--base-model", base, "--out-dir", tmp_path / "noised",
                "--prompts-file", base / "prompts/train.txt", "--negative-prompts-file", base / "prompts/negatives.txt",
                "--source", "forward_noised", "--real-data", base / "train.npz", "--num-steps", "3",
                "--batch-size", "12", "--shard-size", "12", "--no-progress"))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["conditioning"] == "text" and metrics["samples_per_w"] == 10
    row = metrics["per_w"]["w2"]
    for key in ("accuracy_cfg", "accuracy_agd", "accuracy_unguided"):
        assert 0.0 <= row[key] <= 1.0
    for key in ("fid_cfg", "fid_agd", "fid_to_cfg_agd", "rmse_to_cfg_agd", "images_per_second_agd"):
        assert np.isfinite(row[key]) and row[key] >= 0
    check = metrics["negative_prompt_check"]
    assert set(check["negative_digit_rate"]) == {"unguided", "cfg", "agd"}
    assert "negative_avoidance_ratio" in metrics["summary_in_training_range"]
    assert (evaluation / "grids" / "w2.png").is_file() and (evaluation / "grids" / "negative_prompt.png").is_file()
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["negative_avoidance_ratio"] == metrics["summary_in_training_range"]["negative_avoidance_ratio"]
    assert np.isfinite(summary["gap_closed"])  # on fresh CFG trajectories of the evaluation prompts
    config = json.loads((adapters / "adapter_config.json").read_text())
    # the validation grid after the last step: CFG | AGD at two w, prompts of the store as rows
    assert [p.name for p in (adapters / "validation").iterdir()] == ["step-000003.png"]
    assert "negative_text" in config["adapter"]["condition_on"]  # the store holds negative prompts
    if family != "sd":  # pooled models also see the mean of the prompt tokens, by default
        assert {"text_mean", "negative_text_mean"} <= set(config["adapter"]["condition_on"])

    pipe = textdigits.load_pipeline(base)
    assert type(pipe).__name__ == {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                                   "sd3": "StableDiffusion3Pipeline"}[family]
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": textdigits.MAX_TOKENS} if family == "sd3" else {}
    image = pipe("a bold seven", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra).images
    assert image.shape == (1, 16, 16, 3)


# ---------------------------------------------------------------------- the evaluation's judges


def test_accuracy_counts_the_classifier_agreeing_with_the_prompt(shared_dir):
    from agd_pipeline.evaluation import Judges

    data = np.load(shared_dir / "digits.npz")
    images = torch.from_numpy(data["x_hold"][:40]).expand(-1, 3, -1, -1)  # RGB, as the VAE decodes
    judge = textdigits.load_judge(shared_dir)
    predicted = judge(images).argmax(1)
    labels = predicted.clone()
    labels[:10] = (labels[:10] + 1) % 10  # a quarter of the "prompts" ask for another digit
    judges = Judges(str(shared_dir), labels, shared_dir / "unused_real", judge=EMBEDDED_JUDGE)
    assert judges.accuracy(images) == 0.75  # exactly 30 / 40
    assert Judges(str(shared_dir), None, shared_dir / "unused_real", judge=EMBEDDED_JUDGE).accuracy(images) is None
    assert Judges(str(shared_dir), labels, shared_dir / "unused_real").accuracy(images) is None  # no evaluate.judge


def _write(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def test_fid_in_classifier_space_is_the_frechet_distance_of_its_features(shared_dir, tmp_path):
    from scipy import linalg

    from agd_pipeline.evaluation import CleanFid
    from agd_pipeline.judges import JudgeFeatures
    from defaults.judges import ClassifierJudge

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    b = (a // 4).astype(np.uint8)  # darker: a different feature distribution
    extractor = JudgeFeatures(ClassifierJudge(textdigits.load_judge(shared_dir)))
    fid = CleanFid(extractor)
    folder_a, folder_b = _write(tmp_path / "a", a), _write(tmp_path / "b", b)

    def features(x):
        return extractor(torch.from_numpy(x).permute(0, 3, 1, 2).float()).double().numpy()

    fa, fb = features(a), features(b)
    mu_a, mu_b, s_a, s_b = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root)
    assert fid(folder_a, folder_b) == pytest.approx(expected, rel=1e-3)
    assert fid(folder_a, folder_a) < 1e-3 * expected  # and the two sets do differ


def test_text_base_never_replaces_a_folder_it_did_not_write(shared_dir, tmp_path):
    """A user's folder as text_base.out_dir is refused before training and left as it was; the stage's own
    earlier output is replaced whole (written next to it, then swapped in)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    result = run_main("stages.text_base", "--params", "pipelines/text/sd.yaml", "--shared", shared_dir,
                     "--out-dir", theirs, "--no-progress", *TINY_BASE)
    assert result.returncode == 2 and "not a text_base output" in result.stderr and "nothing was changed" in \
        result.stderr
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and (theirs / "notes.txt").read_text() == "keep me"

    ours = tmp_path / "ours"
    for _ in range(2):  # the second run replaces the first one's folder
        _ok(run_main("stages.text_base", "--params", "pipelines/text/sd.yaml", "--shared", shared_dir,
                    "--out-dir", ours, "--no-progress", *TINY_BASE))
    assert (ours / "model_index.json").is_file() and (ours / "prompts" / "eval.tsv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]  # no staging folder left behind
    (ours / "extra.txt").write_text("a file the stage does not write")
    again = run_main("stages.text_base", "--params", "pipelines/text/sd.yaml", "--shared", shared_dir,
                    "--out-dir", ours, "--no-progress", *TINY_BASE)
    assert again.returncode == 2 and "extra.txt" in again.stderr and (ours / "extra.txt").is_file()
    (ours / "extra.txt").unlink()
    (ours / "agd_base.json").write_bytes(b"\xff{ not json")
    damaged = run_main("stages.text_base", "--params", "pipelines/text/sd.yaml", "--shared", shared_dir,
                      "--out-dir", ours, "--no-progress", *TINY_BASE)
    assert damaged.returncode == 2 and damaged.stderr.count("\n") == 1 and "not a text_base output" in damaged.stderr
    assert (ours / "model_index.json").is_file()


# ---------------------------------------------------------------------- fine-tuned derivatives


@pytest.mark.slow
@pytest.mark.parametrize("family,mode", [("sd3", "lora"), ("sd3", "full"), ("sd", "lora")])
def test_a_text_default_fine_tunes_into_a_derivative_of_its_family(shared_dir, tmp_path, family, mode):
    """stages.finetune on a text default (pipelines/derivatives-sd3): the family's pipeline again, with
    the weights its mode trains changed, the bold held-out digits, and the original's adapters loading
    into it with the fine-tune warning."""
    from agd_pipeline.adapters import AdaptedModel, AdapterConfig, load_adapted_model, save_adapters
    from defaults.finetune import DERIVATIVE_ENTRIES
    from agd_pipeline.models import load_base_model

    base, derived = tmp_path / "base", tmp_path / "derived"
    _ok(run_main("stages.text_base", "--params", f"pipelines/text/{family}.yaml", "--shared", shared_dir,
                "--out-dir", base, "--no-progress", *TINY_BASE))
    result = _ok(run_main("stages.finetune", "--params", "pipelines/derivatives-sd3/params.yaml", "--base-model",
                         base, "--out-dir", derived, "--mode", mode, "--steps", "3", "--batch-size", "8",
                         "--learning-rate", "0.05", "--no-progress"))
    assert f"fine-tuned derivative ({mode}) of the embedded {family} default" in result.stdout
    original, derivative = load_base_model(str(base)), load_base_model(str(derived))
    assert derivative.family == original.family and derivative.conditioning == "text"
    assert derivative.architecture_fingerprint() == original.architecture_fingerprint()
    before, after = original.net.state_dict(), derivative.net.state_dict()
    assert set(after) == set(before)  # a merged LoRA leaves no extra weights behind
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projections = {k for k in before if any(f".{p}." in k for p in ("to_q", "to_k", "to_v", "to_out.0"))}
    if mode == "lora":
        assert changed and changed <= projections
    else:
        assert changed - projections
    meta = json.loads((derived / "agd_base.json").read_text())
    assert meta["derived_from_weights"] == original.weights_fingerprint()
    assert meta.get("max_sequence_length") == (textdigits.MAX_TOKENS if family == "sd3" else None)
    # fine-tuned on the bold training digits, measured against the bold held-out ones
    shared = np.load(shared_dir / "digits.npz")
    assert meta["training_images"] == int((shared["w_train"] == 2).sum())
    kept = np.load(derived / "holdout.npz")
    assert np.array_equal(kept["labels"], shared["y_hold"][shared["w_hold"] == 2])
    assert {p.name for p in derived.iterdir()} <= DERIVATIVE_ENTRIES
    assert (derived / "prompts" / "eval.tsv").is_file()  # the original's prompt sets come along
    assert type(textdigits.load_pipeline(derived)) is type(textdigits.load_pipeline(base))
    placement = "attention+output" if family == "sd3" else "cross_attention"
    adapted = AdaptedModel(original, AdapterConfig(width=4, embed_dim=8, placement=placement,
                                                   condition_on=["guidance", "timestep"]))
    save_adapters(adapted, tmp_path / "adapters", extra={"sampler": {"num_steps": 4},
                                                         "guidance": {"min": 1.0, "max": 5.0}})
    with pytest.warns(UserWarning, match="e.g. a fine-tune"):
        load_adapted_model(tmp_path / "adapters", derivative)


@pytest.mark.bad_input
def test_finetune_refuses_a_text_base_without_its_recipe(shared_dir, tmp_path):
    from agd_pipeline.config import load_config
    from defaults.config import FinetuneConfig
    from agd_pipeline.errors import ModelError
    from defaults.finetune import finetune

    base = tmp_path / "base"
    _ok(run_main("stages.text_base", "--params", "pipelines/text/sd3.yaml", "--shared", shared_dir,
                "--out-dir", base, "--no-progress", *TINY_BASE))
    (base / "resolved_config.json").unlink()
    config = load_config(FinetuneConfig, {"base_model": str(base), "out_dir": str(tmp_path / "d"), "steps": 2,
                                          "batch_size": 4})
    with pytest.raises(ModelError, match="resolved_config.json.*text_base"):
        finetune(config, progress=False)
    assert not (tmp_path / "d").exists()
