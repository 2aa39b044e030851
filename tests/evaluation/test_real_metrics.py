"""agd_pipeline.real_metrics: clean-fid FID with a tiny random feature network, CLIPScore with a tiny random CLIP."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from tiny_pipelines import make_clip_tokenizer

from agd_pipeline import real_metrics
from agd_pipeline.errors import ConfigError
from agd_pipeline.real_metrics import clip_score, inception_fid, reference_statistics

# ------------------------------------------------------------------------------------------------ FID


class TinyExtractor(torch.nn.Module):
    """A seeded random conv net: float images [B, 3, H, W] in [0, 255] -> features [B, 4]."""

    def __init__(self, seed: int = 0, dim: int = 4):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
            self.head = torch.nn.Linear(8 * 4, dim)
            self.head.weight.data *= 10  # features of order 1, FIDs well above rounding
        self.eval()

    def forward(self, x):
        x = torch.tanh(self.conv(x / 127.5 - 1))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


@pytest.fixture(scope="module")
def extractor():
    return TinyExtractor()


def blocky_images(n: int, size: int, blocks: int, low: int, high: int, seed: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: random colour blocks (blocks x blocks), values in [low, high)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(low, high, size=(n, blocks, blocks, 3), dtype=np.uint8)
    step = -(-size // blocks)
    return coarse.repeat(step, axis=1).repeat(step, axis=2)[:, :size, :size]


def write_folder(folder, images: np.ndarray):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    bright = write_folder(root / "bright", blocky_images(12, 16, 4, 0, 256, seed=1))
    dark = write_folder(root / "dark", blocky_images(12, 16, 2, 0, 90, seed=2))
    return bright, dark


def test_fid_of_a_folder_against_itself_is_zero(folders, extractor):
    bright, _ = folders
    assert abs(inception_fid(bright, bright, extractor=extractor)) < 1e-3


def test_fid_between_different_sets_is_positive_and_symmetric(folders, extractor):
    bright, dark = folders
    ab = inception_fid(bright, dark, extractor=extractor)
    ba = inception_fid(dark, bright, extractor=extractor, batch_size=5)
    assert ab > 1
    assert ab == pytest.approx(ba, rel=1e-5)


def test_fid_against_precomputed_statistics_equals_fid_against_the_folder(folders, extractor, tmp_path):
    bright, dark = folders
    written = reference_statistics(dark, tmp_path / "stats" / "dark", extractor=extractor)
    assert written == tmp_path / "stats" / "dark.npz" and written.is_file()
    with np.load(written) as data:
        assert sorted(data.files) == ["mu", "sigma"]
        assert data["mu"].shape == (4,) and data["sigma"].shape == (4, 4)
    against_npz = inception_fid(bright, written, extractor=extractor)
    against_folder = inception_fid(bright, dark, extractor=extractor)
    assert against_npz == pytest.approx(against_folder, rel=1e-6)


def test_fid_matches_a_direct_frechet_distance(tmp_path, extractor):
    # 299x299 images pass clean-fid's "clean" resize unchanged, so the features are extractor(images).
    a = blocky_images(8, 299, 13, 0, 256, seed=3)
    b = blocky_images(8, 299, 13, 0, 100, seed=4)
    fid_value = inception_fid(write_folder(tmp_path / "a", a), write_folder(tmp_path / "b", b), extractor=extractor)

    def features(images):
        with torch.no_grad():
            return extractor(torch.from_numpy(images).permute(0, 3, 1, 2).float()).double().numpy()

    fa, fb = features(a), features(b)
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    # FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert expected > 1
    assert fid_value == pytest.approx(expected, rel=1e-6)


def test_missing_and_empty_folders_are_config_errors(tmp_path, folders, extractor):
    bright, _ = folders
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="does not exist") as err:
        inception_fid(missing, bright, extractor=extractor)
    assert str(missing) in str(err.value)
    with pytest.raises(ConfigError) as err:
        inception_fid(bright, missing, extractor=extractor)
    assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no images") as err:
        inception_fid(empty, bright, extractor=extractor)
    assert str(empty) in str(err.value)

    single = write_folder(tmp_path / "single", blocky_images(1, 16, 4, 0, 256, seed=5))
    with pytest.raises(ConfigError, match="at least 2") as err:
        reference_statistics(single, tmp_path / "single.npz", extractor=extractor)
    assert str(single) in str(err.value)


@pytest.mark.bad_input
def test_bad_reference_statistics_are_config_errors(tmp_path, folders, extractor):
    bright, _ = folders
    no_mu = tmp_path / "no_mu.npz"
    np.savez(no_mu, sigma=np.eye(4))
    with pytest.raises(ConfigError, match="mu") as err:
        inception_fid(bright, no_mu, extractor=extractor)
    assert str(no_mu) in str(err.value)

    wrong_dim = tmp_path / "wrong_dim.npz"
    np.savez(wrong_dim, mu=np.zeros(6), sigma=np.eye(6))
    with pytest.raises(ConfigError, match="6 features|same feature extractor"):
        inception_fid(bright, wrong_dim, extractor=extractor)

    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ConfigError, match="shape") as err:
        inception_fid(bright, bad_shape, extractor=extractor)
    assert str(bad_shape) in str(err.value)

    with pytest.raises(ConfigError, match="do not exist") as err:
        inception_fid(bright, tmp_path / "absent.npz", extractor=extractor)
    assert "absent.npz" in str(err.value)


def test_default_inception_offline_is_a_helpful_config_error(monkeypatch, folders):
    import cleanfid.inception_torchscript

    def no_network(fpath="./"):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # InceptionV3W.__init__ calls this before loading the weights, whether or not the file is on disk.
    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", no_network)
    real_metrics._inception.cache_clear()
    bright, _ = folders
    with pytest.raises(ConfigError) as err:
        inception_fid(bright, bright)
    message = str(err.value)
    assert "\n" not in message
    assert "inception-2015-12-05.pt" in message and str(real_metrics.inception_weights_path()) in message
    assert "extractor=" in message and "name resolution" in message


# ------------------------------------------------------------------------------------------ CLIPScore


PROMPTS = ["a red square", "green grass", "blue sky at noon over the sea", "a cat", "night", "yellow sun"]
# The tiny tokenizer spells words out per character (spaces are not tokens): these 14 letters fill the
# 16 text positions together with BOS and EOS, and anything after them is cut off.
TRUNCATED = "abcdefghijklmn"


@pytest.fixture(scope="module")
def clip_images():
    return blocky_images(len(PROMPTS), 40, 5, 0, 256, seed=7)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_images):
    """A tiny random CLIP saved with its processor: the first seed whose cosines on (clip_images, PROMPTS)
    have both signs, so that the clamp at 0 matters, and are positive for some grey image with TRUNCATED."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("clip")
    tokenizer = make_clip_tokenizer(root / "tokenizer")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for seed in range(20):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config).eval()
        folder = root / f"clip{seed}"
        model.save_pretrained(folder)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
        cosines = direct_cosines(folder, clip_images, PROMPTS)
        grey_as_rgb = np.repeat(clip_images[..., :1], 3, axis=-1)
        truncated = direct_cosines(folder, grey_as_rgb, [TRUNCATED] * len(clip_images))
        if (cosines > 0.02).any() and (cosines < -0.02).any() and (truncated > 0.02).any():
            return folder
    raise AssertionError("no seed gave a tiny CLIP with both positive and negative cosines")


def direct_cosines(folder, images, prompts) -> np.ndarray:
    """cos(image embedding, prompt embedding) per pair, computed here from the saved model."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    text = processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(**text)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).double().numpy()


def direct_clip_score(folder, images, prompts) -> float:
    """CLIPScore: mean over pairs of 100 * max(cos, 0)."""
    return float(np.mean(100 * np.maximum(direct_cosines(folder, images, prompts), 0)))


def test_clip_score_matches_a_direct_computation(clip_folder, clip_images):
    score = clip_score(clip_images, PROMPTS, clip_folder, batch_size=4)
    assert 0 <= score <= 100
    assert score == pytest.approx(direct_clip_score(clip_folder, clip_images, PROMPTS), abs=1e-4)
    assert score > 0


def test_clip_score_depends_on_which_prompt_goes_with_which_image(clip_folder, clip_images):
    swapped = PROMPTS[1:] + PROMPTS[:1]
    assert clip_score(clip_images, swapped, clip_folder) != pytest.approx(
        clip_score(clip_images, PROMPTS, clip_folder), abs=1e-3)


def test_clip_score_truncates_prompts_and_replicates_grey(clip_folder, clip_images):
    grey = clip_images[:, :, :, 0]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    long_a = [TRUNCATED + " and then a long tail that is cut off"] * len(rgb)
    long_b = [TRUNCATED + " but a different tail"] * len(rgb)
    score = clip_score(grey, long_a, clip_folder)
    assert score > 0
    assert score == pytest.approx(clip_score(grey, long_b, clip_folder), abs=1e-6)
    assert score == pytest.approx(clip_score(rgb, long_a, clip_folder), abs=1e-6)
    assert score == pytest.approx(direct_clip_score(clip_folder, rgb, [TRUNCATED] * len(rgb)), abs=1e-4)


def test_clip_model_is_loaded_once_per_path_and_device(clip_folder, clip_images):
    clip_score(clip_images, PROMPTS, clip_folder)
    hits = real_metrics._clip.cache_info().hits
    clip_score(clip_images, PROMPTS, str(clip_folder))
    assert real_metrics._clip.cache_info().hits == hits + 1


@pytest.mark.bad_input
def test_clip_score_bad_inputs_are_config_errors(clip_folder, clip_images, tmp_path):
    with pytest.raises(ConfigError, match="6 images but 5 prompts"):
        clip_score(clip_images, PROMPTS[:5], clip_folder)
    missing = tmp_path / "no_clip_here"
    with pytest.raises(ConfigError) as err:
        clip_score(clip_images, PROMPTS, missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="uint8"):
        clip_score(clip_images.astype(np.float32), PROMPTS, clip_folder)


# ----------------------------------------------------------------------------- per-sample data behind them


def test_per_image_features_give_inception_fid(folders, extractor, tmp_path):
    """inception_features and load_reference: the per-image data whose FID is inception_fid's number,
    against a reference folder (its features) and against its statistics (mu and sigma only)."""
    bright, dark = folders
    features = real_metrics.inception_features(bright, extractor=extractor)
    assert features.shape == (12, 4) and features.dtype == np.float64
    as_folder = real_metrics.load_reference(dark, extractor=extractor)
    assert set(as_folder) == {"features"} and as_folder["features"].shape == (12, 4)
    assert real_metrics.fid_from_features(features, as_folder) == inception_fid(bright, dark, extractor=extractor)
    stats = reference_statistics(dark, tmp_path / "dark.npz", extractor=extractor)
    as_stats = real_metrics.load_reference(stats)
    assert set(as_stats) == {"mu", "sigma"}
    assert real_metrics.fid_from_features(features, as_stats) == inception_fid(bright, stats, extractor=extractor)
    # one row per image, in sorted file order: a folder of the first two images gives the first two rows
    first_two = write_folder(tmp_path / "first_two", blocky_images(12, 16, 4, 0, 256, seed=1)[:2])
    np.testing.assert_allclose(real_metrics.inception_features(first_two, extractor=extractor), features[:2], rtol=1e-6)
    with pytest.raises(ConfigError, match="do not exist"):
        real_metrics.load_reference(tmp_path / "absent.npz")


def test_per_image_clip_scores_average_to_clip_score(clip_folder, clip_images):
    scores = real_metrics.clip_scores(clip_images, PROMPTS, clip_folder, batch_size=4)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float64
    direct = 100 * np.maximum(direct_cosines(clip_folder, clip_images, PROMPTS), 0)
    np.testing.assert_allclose(scores, direct, atol=1e-4)
    assert (scores == 0).any() and (scores > 0).any()  # the floor at 0 is per image
    assert real_metrics.clip_score_of(scores) == clip_score(clip_images, PROMPTS, clip_folder, batch_size=4)


# ------------------------------------------------------------------ the evaluate stage on a "real" checkpoint


@pytest.fixture(scope="module")
def untrained_adapters(tiny_base_dir, tmp_path_factory):
    """Adapters for the tiny class DiT as stages.train writes them (untrained: evaluate needs no more)."""
    from conftest import write_untrained_adapters

    return write_untrained_adapters(tiny_base_dir, tmp_path_factory.mktemp("real_adapters") / "adapters", 3)


@pytest.mark.parametrize("reference", ["folder", "statistics"])
def test_evaluate_keeps_per_sample_inception_features_and_intervals(untrained_adapters, extractor, tmp_path,
                                                                   monkeypatch, reference):
    """`python -m stages.evaluate --fid-reference` on a checkpoint without a judge (the tiny DiT, clean-fid's
    Inception replaced by the tiny extractor): features.npz holds every sample set's features and the
    reference's (or its mu and sigma), metrics.json the real_model intervals, whose points are the per-w
    Inception FIDs; `stages.report` renders them and --check recomputes them."""
    import json

    import stages.evaluate
    from agd_pipeline import evidence
    from stages.report import main as report

    monkeypatch.setattr(real_metrics, "_inception", lambda device: extractor)
    folder = write_folder(tmp_path / "reference", blocky_images(24, 16, 4, 0, 256, seed=9))
    given = folder if reference == "folder" else reference_statistics(folder, tmp_path / "ref.npz",
                                                                      extractor=extractor)
    out = tmp_path / "eval"
    assert stages.evaluate.main(["--adapters", str(untrained_adapters), "--out-dir", str(out), "--device", "cpu",
                                 "--samples-per-class", "2", "--guidance-scales", "2, 7", "--batch-size", "40",
                                 "--fid-reference", str(given), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    n = metrics["samples_per_w"]
    assert not (out / evidence.OUTCOMES).exists()  # no judge
    real_rows = evidence.read_outcomes(out / evidence.REAL_OUTCOMES, evidence.REAL_COLUMNS)
    assert len(real_rows) == 5 * n and all(r["clip_score"] is None for r in real_rows)
    with np.load(out / evidence.FEATURES) as data:
        keys = set(data.files)
        assert data["inception/cfg_w2"].shape == (n, 4)
    sets = {"inception/unguided", "inception/cfg_w2", "inception/agd_w2", "inception/cfg_w7", "inception/agd_w7"}
    assert keys == sets | ({"inception/real"} if reference == "folder" else
                           {"inception/reference_mu", "inception/reference_sigma"})
    real = metrics["evidence"]["real_model"]
    assert real["fid_reference"]["resampled"] == (reference == "folder")
    for w in ("w2", "w7"):
        for method in ("unguided", "cfg", "agd"):
            stored = metrics["per_w"][w][f"inception_fid_{method}"]
            assert stored == pytest.approx(inception_fid(out / "samples" / (method if method == "unguided" else
                                                                            f"{method}/{w}"), given,
                                                         extractor=extractor), rel=1e-9)
            estimate = real["per_w"][w][f"inception_fid_{method}"]
            assert estimate["point"] == pytest.approx(stored, rel=1e-4)  # from float32 features.npz
            assert estimate["low"] <= estimate["point"] <= estimate["high"]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    assert report(["--metrics", str(out / "metrics.json"), "--readme", str(readme)]) == 0
    assert "| w | Inception FID unguided |" in readme.read_text()
    assert report(["--metrics", str(out / "metrics.json"), "--readme", str(readme), "--check"]) == 0


def test_evaluate_keeps_per_sample_clip_scores_beside_inception_features(clip_folder, clip_images, extractor,
                                                                         tmp_path, monkeypatch):
    """The evaluate stage's judges with a tiny CLIP and the tiny extractor (a text checkpoint without a
    digit judge, three prompts of two samples): real_outcomes.csv holds every sample's CLIP score, the
    per-w numbers are clip_score's and inception_fid's, and the real_model intervals (clustered by
    prompt) have them as points."""
    from agd_pipeline import evidence
    from agd_pipeline.evaluation import Judges, write_evidence, write_pngs

    monkeypatch.setattr(real_metrics, "_inception", lambda device: extractor)
    reference = write_folder(tmp_path / "reference", blocky_images(12, 40, 5, 0, 256, seed=11))
    judges = Judges(str(tmp_path / "no_judge_here"), None, tmp_path / "samples" / "real", str(reference),
                    str(clip_folder), PROMPTS)
    sets = {("unguided", None): clip_images, ("cfg", 2.0): blocky_images(6, 40, 5, 0, 256, seed=12),
            ("agd", 2.0): blocky_images(6, 40, 5, 20, 256, seed=13)}
    numbers = {}
    for (method, w), pixels in sets.items():
        folder = tmp_path / "samples" / (method if w is None else f"{method}/w{w:g}")
        write_pngs(pixels, folder)
        numbers[(method, w)] = judges.real_model_metrics(method, folder, pixels, w)
        assert numbers[(method, w)] == {
            f"inception_fid_{method}": pytest.approx(inception_fid(folder, reference, extractor=extractor), rel=1e-12),
            f"clip_score_{method}": clip_score(pixels, PROMPTS, clip_folder)}
    out = tmp_path / "eval"
    out.mkdir()
    prompts = np.arange(6) // 2  # two samples per prompt: the bootstrap draws prompts
    assessed = write_evidence(out, judges, None, {}, tmp_path / "samples", [2.0], 1.0, prompts)
    rows = evidence.read_outcomes(out / evidence.REAL_OUTCOMES, evidence.REAL_COLUMNS)
    cfg = [r["clip_score"] for r in rows if r["method"] == "cfg"]
    np.testing.assert_allclose(cfg, real_metrics.clip_scores(sets[("cfg", 2.0)], PROMPTS, clip_folder), rtol=1e-15)
    assert assessed["bootstrap"]["clusters"] == "prompt" and set(assessed) == {"real_model", "bootstrap"}
    row = assessed["real_model"]["per_w"]["w2"]
    for method in ("unguided", "cfg", "agd"):
        key = (method, None if method == "unguided" else 2.0)
        assert row[f"clip_score_{method}"]["point"] == pytest.approx(numbers[key][f"clip_score_{method}"], rel=1e-12)
        assert row[f"inception_fid_{method}"]["point"] == pytest.approx(numbers[key][f"inception_fid_{method}"],
                                                                         rel=1e-4)
    difference = row["clip_score_difference_agd_minus_cfg"]
    assert difference["point"] == pytest.approx(row["clip_score_agd"]["point"] - row["clip_score_cfg"]["point"])
    assert difference["low"] <= difference["point"] <= difference["high"]
    with np.load(out / evidence.FEATURES) as data:
        assert set(data.files) == {"inception/unguided", "inception/cfg_w2", "inception/agd_w2", "inception/real"}
