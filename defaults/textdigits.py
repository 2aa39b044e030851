"""The embedded text-to-image defaults: SD, SDXL and SD3 pipelines trained here on captioned digits.

Nothing is downloaded. scikit-learn's 8x8 digits, upscaled to 16x16, get captions generated from
what each image shows: the digit (as a word or a numeral) and its stroke weight, measured from the
image (the lightest and heaviest third of each digit's ink are "thin" and "bold"), in varied
templates; a share of captions name no digit at all ("a handwritten digit"), so a prompt can leave
the digit open and a negative prompt can rule one out.

Two steps, each a stage:

* :func:`prepare_shared` (stage ``text_data``) trains what the three families share: a small
  ``AutoencoderKL`` (16x16 images <-> 4x8x8 latents), the evaluation classifier (accuracy and the
  FID feature space), the caption sets and the held-out digits.
* :func:`train_family_base` (stage ``text_base``) builds a family's own architecture in tiny form
  (SD: ``UNet2DConditionModel`` with cross-attention and one CLIP text encoder; SDXL: two encoders,
  pooled embedding and time ids; SD3: ``SD3Transformer2DModel`` with joint attention, flow matching),
  trains its denoiser on the digits and writes a pipeline folder that ``from_pretrained`` loads.

The text encoders are frozen at a seeded initialisation, as Stable Diffusion freezes its CLIP: a
fixed map from words to embeddings that the denoiser learns to read. Their token embeddings are
scaled to unit size first (CLIP's own initialisation gives 0.02, which would leave the
penultimate-layer states that SDXL and SD3 use at noise level).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from agd_pipeline.errors import ModelError, command_line
from agd_pipeline.optim import check_finite, cosine_with_warmup, descent_step
from agd_pipeline.outputs import check_replaceable, staging_folder, swap_in
from agd_pipeline.prompts import (EVAL_PROMPTS, NEGATIVE_CHECK, PROMPTS_DIR, TEST_NEGATIVE_CHECK, TEST_PROMPTS,
                                  read_eval_prompts)

IMAGE_SIZE = 16
LATENT_SIZE = 8
LATENT_CHANNELS = 4
MAX_TOKENS = 16  # the tokenizers' model_max_length: every caption fits
FAMILIES = ("sd", "sdxl", "sd3")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS = ("thin", "", "bold")  # stroke weight tertiles within each digit; the middle goes unsaid

# {d}: the digit as a word or numeral; {w}: "thin " / "bold " / "" (with its space)
DIGIT_TEMPLATES = (
    "a {w}handwritten {d}", "the digit {d}", "a {w}{d}", "a {d} written in {w}strokes", "number {d}",
    "{d}", "a picture of a {w}{d}", "the number {d} drawn by hand", "a {w}{d} on a dark background",
)
AGNOSTIC_TEMPLATES = ("a {w}handwritten digit", "a digit", "some handwritten number", "a {w}digit on a dark background")
NEGATIVE_TEMPLATES = ("the digit {d}", "a {d}", "number {d}")
AGNOSTIC_CHECK_PROMPT = "a handwritten digit"
# The test split's phrasings, which neither a base (its captions) nor stage one (its prompts) sees. The words are
# the training templates' own, in new orders: see the vocabulary check below.
TEST_DIGIT_TEMPLATES = (
    "the {w}handwritten digit {d}", "a {w}{d} drawn by hand", "the digit {d} written in {w}strokes",
    "a picture of the {w}number {d}", "the {w}number {d} on a dark background", "a {w}digit {d} written by hand",
    "digit {d}", "the {w}{d}",
)
TEST_NEGATIVE_TEMPLATES = ("the number {d}", "a picture of the digit {d}", "the handwritten {d}")
TEST_AGNOSTIC_CHECK_PROMPT = "a digit drawn by hand"
TRAINING_TEMPLATES = DIGIT_TEMPLATES + AGNOSTIC_TEMPLATES + NEGATIVE_TEMPLATES + (AGNOSTIC_CHECK_PROMPT,)
TEST_TEMPLATES = TEST_DIGIT_TEMPLATES + TEST_NEGATIVE_TEMPLATES + (TEST_AGNOSTIC_CHECK_PROMPT,)

SHARED_FILES = ("vae", "classifier", "digits.npz", "prompts")
TRAIN_PROMPTS, NEGATIVE_PROMPTS = "train.txt", "negatives.txt"  # stage one's prompts and negative prompts
# what evaluate reads from a base folder (agd_pipeline.prompts): eval.tsv and negative_check.json; the test
# split (reporting only): held-out digits in TEST_DIGIT_TEMPLATES, the check with TEST_NEGATIVE_TEMPLATES


# ------------------------------------------------------------------------------------ the data


def load_digits16(seed: int, holdout_fraction: float):
    """Digits in [-1, 1] as [N, 1, 16, 16] (bilinear 2x upscale of the 8x8 originals), split into
    train and held-out, stratified, plus each image's stroke weight (0 thin, 1 middle, 2 bold)."""
    from defaults.toy import load_digits_split

    x_train, y_train, x_hold, y_hold = load_digits_split(seed, holdout_fraction)
    up = [F.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear", align_corners=False).numpy()
          for x in (x_train, x_hold)]
    return up[0], y_train, up[1], y_hold, stroke_weights(x_train, y_train), stroke_weights(x_hold, y_hold)


def stroke_weights(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0 / 1 / 2 for the lightest, middle and heaviest third of ink within each digit."""
    ink = (images + 1).reshape(len(images), -1).sum(1)
    weights = np.ones(len(images), dtype=np.int64)
    for digit in np.unique(labels):
        mask = labels == digit
        low, high = np.quantile(ink[mask], [1 / 3, 2 / 3])
        weights[mask & (ink <= low)] = 0
        weights[mask & (ink > high)] = 2
    return weights


def caption(rng: np.random.Generator, digit: int, weight: int, agnostic: bool = False) -> str:
    """One caption of an image: a random template, the digit as a word or a numeral."""
    templates = AGNOSTIC_TEMPLATES if agnostic else DIGIT_TEMPLATES
    template = templates[rng.integers(len(templates))]
    word = WEIGHTS[weight]
    named = DIGIT_WORDS[digit] if rng.random() < 0.5 else str(digit)
    return template.format(d=named, w=f"{word} " if word else "")


def caption_set(labels: np.ndarray, weights: np.ndarray, seed: int, per_image: int, agnostic_share: float):
    """``per_image`` captions of every image: (captions, image index per caption)."""
    rng = np.random.default_rng(seed)
    captions, owners = [], []
    for i, (digit, weight) in enumerate(zip(labels.tolist(), weights.tolist())):
        for _ in range(per_image):
            captions.append(caption(rng, digit, weight, agnostic=rng.random() < agnostic_share))
            owners.append(i)
    return captions, np.asarray(owners, dtype=np.int64)


def vocabulary() -> list[str]:
    """Every word a caption, negative prompt or check prompt can hold (the tokenizers' words: training templates
    only, so a base's tokenizer does not change with the test split)."""
    return sorted(set(DIGIT_WORDS) | {str(d) for d in range(10)} | {w for w in WEIGHTS if w}
                  | template_words(TRAINING_TEMPLATES))


def template_words(templates) -> set[str]:
    """The fixed words of templates (not what {d} and {w} fill in)."""
    return {part for template in templates for part in template.replace("{w}", "").split() if "{" not in part}


# A word outside the vocabulary would be spelled out character by character, which no base learned; adding it to
# the vocabulary would change every tokenizer and so every trained base. The test phrasings only reorder words.
assert template_words(TEST_TEMPLATES) <= set(vocabulary()), template_words(TEST_TEMPLATES) - set(vocabulary())


def phrasings(template: str) -> set[str]:
    """Every text a template writes: each digit as a word and as a numeral, each stroke weight."""
    return {template.format(d=name, w=f"{word} " if word else "")
            for d in range(10) for name in (DIGIT_WORDS[d], str(d)) for word in WEIGHTS}


def training_captions() -> set[str]:
    """Every caption a base (or a fine-tuned derivative) can have been trained on."""
    return set().union(*map(phrasings, DIGIT_TEMPLATES + AGNOSTIC_TEMPLATES))


def write_prompt_files(folder: Path, train_labels, train_weights, hold_labels, hold_weights, config) -> np.ndarray:
    """The prompt sets the later stages read: training prompts for generate (captions of training
    images, every template), held-out prompts with their digit for evaluate (digit templates only, so
    accuracy is defined), negative prompts naming each digit, and the negative-prompt check; and the test split
    (reporting only): the same held-out images and check in held-out phrasings (TEST_PROMPTS, TEST_NEGATIVE_CHECK).
    Returns the training image each training prompt captions (the real data of forward-noised
    stores: :func:`write_real_pairs`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed + 7)
    # training prompts: captions of training images drawn at random (with replacement only where
    # there are more prompts than images)
    images = rng.choice(len(train_labels), config.generate_prompts, replace=config.generate_prompts > len(train_labels))
    train = [caption(rng, int(train_labels[i]), int(train_weights[i]), agnostic=rng.random() < config.agnostic_share)
             for i in images]
    (folder / TRAIN_PROMPTS).write_text("\n".join(train) + "\n")
    picks = [i for d in range(10) for i in np.flatnonzero(hold_labels == d)[:config.eval_prompts_per_digit]]
    lines = [f"{hold_labels[i]}\t{caption(rng, int(hold_labels[i]), int(hold_weights[i]))}" for i in picks]
    (folder / EVAL_PROMPTS).write_text("\n".join(lines) + "\n")
    negatives = [t.format(d=name) for d in range(10) for name in (DIGIT_WORDS[d], str(d)) for t in NEGATIVE_TEMPLATES]
    (folder / NEGATIVE_PROMPTS).write_text("\n".join(negatives) + "\n")
    check = {"prompt": AGNOSTIC_CHECK_PROMPT, "negatives": {str(d): f"the digit {DIGIT_WORDS[d]}" for d in range(10)}}
    (folder / NEGATIVE_CHECK).write_text(json.dumps(check, indent=2) + "\n")

    # The test split: the same held-out images in phrasings no base, stage one or validation run sees. Its own
    # random stream, so the files above stay byte for byte what they were for a seed.
    seen = (training_captions() | set(train) | {line.split("\t", 1)[1] for line in lines} | set(negatives)
            | {check["prompt"], *check["negatives"].values()})
    test_rng = np.random.default_rng([config.seed, 7, 1])
    used: set[str] = set()
    test_lines = []
    for i in picks:
        prompt = held_out_caption(test_rng, int(hold_labels[i]), int(hold_weights[i]), seen, used)
        used.add(prompt)
        test_lines.append(f"{hold_labels[i]}\t{prompt}")
    (folder / TEST_PROMPTS).write_text("\n".join(test_lines) + "\n")
    test_check = {"prompt": TEST_AGNOSTIC_CHECK_PROMPT,
                  "negatives": {str(d): TEST_NEGATIVE_TEMPLATES[0].format(d=DIGIT_WORDS[d]) for d in range(10)}}
    seen_before = [text for text in (test_check["prompt"], *test_check["negatives"].values()) if text in seen]
    if seen_before:
        raise ModelError(f"the test negative-prompt check {seen_before} is also a training or validation prompt: "
                         "change TEST_NEGATIVE_TEMPLATES / TEST_AGNOSTIC_CHECK_PROMPT")
    (folder / TEST_NEGATIVE_CHECK).write_text(json.dumps(test_check, indent=2) + "\n")
    return images.astype(np.int64)


def held_out_caption(rng: np.random.Generator, digit: int, weight: int, seen: set[str], used: set[str]) -> str:
    """A test-template caption of one image that is not in ``seen``: the template and the digit's naming drawn at
    random, then (while that caption is seen, or already ``used`` by another test prompt) the other naming and the
    next templates in turn. A caption in ``used`` is taken only when every unseen one is."""
    word = WEIGHTS[weight]
    start = int(rng.integers(len(TEST_DIGIT_TEMPLATES)))
    names = (DIGIT_WORDS[digit], str(digit)) if rng.random() < 0.5 else (str(digit), DIGIT_WORDS[digit])
    order = TEST_DIGIT_TEMPLATES[start:] + TEST_DIGIT_TEMPLATES[:start]
    unseen = [text for text in (t.format(d=name, w=f"{word} " if word else "") for t in order for name in names)
              if text not in seen]
    if not unseen:
        raise ModelError(f"every test phrasing of the digit {digit} is also a training or validation prompt: "
                         "change TEST_DIGIT_TEMPLATES")
    return next((text for text in unseen if text not in used), unseen[0])


def prompt_overlap(folder: str | Path) -> dict:
    """How far a prompts folder's test split is from what training and validation saw: how many test prompts
    (``test.tsv``) and test check texts (the prompt and negatives of ``negative_check_test.json``) occur verbatim
    among the training captions, stage one's prompts, the negative prompts and the validation files; and how many
    test templates can write a training caption, negative or check prompt (an identical template among them)."""
    from agd_pipeline.models import read_prompts

    folder = Path(folder)
    test_prompts = read_eval_prompts(folder / TEST_PROMPTS)[0]
    test_check = json.loads((folder / TEST_NEGATIVE_CHECK).read_text())
    check_texts = [text.strip() for text in (test_check["prompt"], *test_check["negatives"].values())]
    validation_check = json.loads((folder / NEGATIVE_CHECK).read_text())
    sources = {
        "training_captions": training_captions(),
        "stage_one_prompts": set(read_prompts(folder / TRAIN_PROMPTS)),
        "negative_prompts": set(read_prompts(folder / NEGATIVE_PROMPTS)),
        "validation": {*read_eval_prompts(folder / EVAL_PROMPTS)[0],
                       *(t.strip() for t in (validation_check["prompt"], *validation_check["negatives"].values()))},
    }
    counts = {"test_prompts": len(test_prompts), "distinct_test_prompts": len(set(test_prompts)),
              "test_check_texts": len(check_texts)}
    for source, texts in sources.items():
        counts[f"test_prompts_in_{source}"] = sum(text in texts for text in test_prompts)
        counts[f"test_check_texts_in_{source}"] = sum(text in texts for text in check_texts)
    trained = set().union(*map(phrasings, TRAINING_TEMPLATES))
    counts["test_templates_in_training"] = sum(bool(phrasings(t) & trained) for t in TEST_TEMPLATES)
    return counts


# ---------------------------------------------------------------------------- text encoders


def make_word_tokenizer(folder: Path, words: list[str], pad_token: str = "<|endoftext|>"):
    """An offline CLIPTokenizer in which each of ``words`` is one token.

    The vocabulary holds the 256 byte-level characters (alone and with CLIP's ``</w>`` end-of-word
    mark), the merges that build each word left to right, and ``<|startoftext|>``/``<|endoftext|>``
    last, as in CLIP. Any other text still encodes, character by character.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    characters = sorted(ByteLevel.alphabet(), key=ord)
    tokens = characters + [c + "</w>" for c in characters]
    merges: list[tuple[str, str]] = []
    for word in words:
        # BPE applies the lowest-ranked merge first, so one word's merges can split another ("in"
        # inside "thin"): keep appending the merge of the first two pieces until the word is whole.
        pieces = _bpe(word, merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            tokens.append(pieces[0] + pieces[1])
            pieces = _bpe(word, merges)
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS, pad_token=pad_token)


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's byte-pair encoding of one word under ``merges`` (lowest rank first)."""
    rank = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best, at = min(pairs)
        if best == len(rank):
            break
        pieces[at:at + 2] = [pieces[at] + pieces[at + 1]]
    return pieces


def make_text_encoder(tokenizer, hidden_size: int, seed: int, with_projection: bool):
    """A frozen two-layer CLIP text encoder with unit-scale token and position embeddings."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            projection_dim=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    with torch.no_grad():  # the token and position embedding tables
        for table in (m.weight for m in model.modules() if isinstance(m, nn.Embedding)):
            table.mul_(1.0 / table.std())
    return model.requires_grad_(False).eval()


# ------------------------------------------------------------------------------ the shared VAE


def build_vae(config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1,
                         block_out_channels=(config.vae_channels, 2 * config.vae_channels), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=IMAGE_SIZE)


def train_vae(images: torch.Tensor, config, progress: bool = True):
    """An AutoencoderKL on the digits (grey, as RGB): MSE reconstruction plus a small KL term.
    Its config gets ``scaling_factor`` (1 / std of the latents), as real VAEs carry."""
    torch.manual_seed(config.seed + 3)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    gen = torch.Generator().manual_seed(config.seed + 3)
    rgb = images.expand(-1, 3, -1, -1)
    bar = tqdm(range(config.vae_steps), desc="text_data: train VAE", disable=not progress, unit="step")
    for step in bar:
        x = rgb[torch.randint(0, len(rgb), (config.vae_batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean() / z[0].numel()
        check_finite(loss, "text_data: train VAE", step, config.vae_learning_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(rgb).latent_dist.mean
        recon_error = float(F.mse_loss(vae.decode(latents).sample.clamp(-1, 1), rgb))
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, float(latents.mean()), recon_error


# ------------------------------------------------------------------------------- the classifier


class PooledClassifier(nn.Module):
    """The 8x8 digit classifier on 16x16 images: grey, then 2x2 average pooling. ``features`` is the
    FID feature space of the text defaults."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        return F.adaptive_avg_pool2d(x, 8) if x.shape[-1] != 8 else x

    def features(self, x):
        return self.classifier.features(self.prepare(x))

    def forward(self, x):
        return self.classifier(self.prepare(x))


def load_judge(base_dir: str | Path):
    """The base folder's evaluation classifier (pooled when it judges images larger than 8x8)."""
    from defaults.toy import CLASSIFIER_DIR, load_classifier

    classifier = load_classifier(base_dir)
    if classifier is None:
        return None
    config = json.loads((Path(base_dir) / CLASSIFIER_DIR / "config.json").read_text())
    return PooledClassifier(classifier).eval() if config.get("input_size", 8) != 8 else classifier


def prepare_shared(config, progress: bool = True) -> dict:
    """Stage ``text_data``: the VAE, the evaluation classifier, the digits and the prompt sets."""
    from defaults.toy import save_classifier, train_classifier

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_hold, y_hold, w_train, w_hold = load_digits16(config.seed, config.holdout_fraction)
    vae, latent_mean, recon_error = train_vae(torch.from_numpy(x_train), config, progress)
    vae.save_pretrained(out / "vae")
    pooled = [F.avg_pool2d(torch.from_numpy(x), 2).numpy() for x in (x_train, x_hold)]
    classifier_config = SimpleNamespace(seed=config.seed, classifier_steps=config.classifier_steps,
                                        classifier_features=config.classifier_features)
    classifier, accuracy = train_classifier(pooled[0], y_train, pooled[1], y_hold, classifier_config, progress)
    save_classifier(classifier, out / "classifier", {"holdout_accuracy": accuracy, "input_size": IMAGE_SIZE})
    prompt_images = write_prompt_files(out / PROMPTS_DIR, y_train, w_train, y_hold, w_hold, config)
    np.savez_compressed(out / "digits.npz", x_train=x_train, y_train=y_train, w_train=w_train,
                        x_hold=x_hold, y_hold=y_hold, w_hold=w_hold, latent_mean=latent_mean,
                        train_prompt_images=prompt_images)
    return {"vae_reconstruction_mse": recon_error, "classifier_holdout_accuracy": accuracy,
            "vae_scaling_factor": vae.config.scaling_factor}


def load_shared(folder: str | Path) -> dict:
    folder = Path(folder)
    missing = [name for name in SHARED_FILES if not (folder / name).exists()]
    if missing:
        raise ModelError(f"{folder}: not a text_data output (missing {', '.join(missing)}); run "
                         f"`{command_line('text_data')}` (or the text pipeline's data stage) first")
    return dict(np.load(folder / "digits.npz"))


# ------------------------------------------------------------------- the family pipelines


def _sd_schedule(name: str, prediction_type: str = "epsilon"):
    import inspect

    import diffusers

    settings = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                    prediction_type=prediction_type)
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in settings.items() if k in accepted})


def _unet(config, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    ch = config.channels
    both = config.cross_attention_levels == 2  # cross-attention also at the 4x4 level (besides the mid block)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(ch, 2 * ch), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D" if both else "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D" if both else "UpBlock2D", "CrossAttnUpBlock2D"),
        # diffusers' UNet takes the number of heads under the name attention_head_dim
        attention_head_dim=(ch // config.head_dim, 2 * ch // config.head_dim), use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        **extra)


def build_pipeline(family: str, config, vae, scratch: Path):
    """The family's pipeline with an untrained denoiser, frozen text encoders and the shared VAE."""
    import diffusers

    words = vocabulary()
    hidden = config.text_hidden  # every encoder has this width
    tokenizer = make_word_tokenizer(scratch / "tokenizer", words)
    torch.manual_seed(config.seed)
    if family == "sd":
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=make_text_encoder(tokenizer, hidden, config.seed + 1, False), tokenizer=tokenizer,
            unet=_unet(config, hidden), scheduler=_sd_schedule("DDIMScheduler"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    tokenizer_2 = make_word_tokenizer(scratch / "tokenizer_2", words, pad_token="!" if family == "sdxl" else
                                      "<|endoftext|>")
    encoder_2 = make_text_encoder(tokenizer_2, hidden, config.seed + 2, True)
    if family == "sdxl":
        time_dim = 8
        unet = _unet(config, 2 * hidden, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                     projection_class_embeddings_input_dim=6 * time_dim + hidden)
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=make_text_encoder(tokenizer, hidden, config.seed + 1, False),
            text_encoder_2=encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=_sd_schedule("EulerDiscreteScheduler"), add_watermarker=False)
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=config.num_layers, num_attention_heads=config.channels // config.head_dim,
            attention_head_dim=config.head_dim, caption_projection_dim=config.channels,
            joint_attention_dim=2 * hidden, pooled_projection_dim=2 * hidden,
            pos_embed_max_size=LATENT_SIZE)
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                                         shift=config.flow_shift),
            vae=vae, text_encoder=make_text_encoder(tokenizer, hidden, config.seed + 1, True), tokenizer=tokenizer,
            text_encoder_2=encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    raise ModelError(f"unknown text family {family!r}; choose one of {', '.join(FAMILIES)}")


@torch.no_grad()
def encode_captions(pipe, family, captions: list[str], batch_size: int = 256) -> tuple[dict, dict]:
    """(a condition row per caption, the empty prompt's condition as the pipeline makes it), through
    the pipeline's own ``encode_prompt`` (so training sees exactly what sampling will)."""
    view = SimpleNamespace(device=torch.device("cpu"), sample_size=LATENT_SIZE, vae_scale_factor=pipe.vae_scale_factor,
                           info={"meta": {"max_sequence_length": MAX_TOKENS}})
    parts: dict[str, list] = {}
    uncond = None
    for start in range(0, len(captions), batch_size):
        cond, neg = family.encode_prompt(pipe, view, captions[start:start + batch_size], None)
        for name, value in cond.items():
            parts.setdefault(name, []).append(value)
        uncond = uncond or {name: value[:1] for name, value in neg.items()}
    return {name: torch.cat(values) for name, values in parts.items()}, uncond


def train_family_base(family_name: str, config, progress: bool = True) -> dict:
    """Stage ``text_base``: train the family's denoiser on the shared digits; write the pipeline."""
    from diffusers import AutoencoderKL

    from agd_pipeline import families

    shared = load_shared(config.shared)
    family = families.get(family_name)
    vae = AutoencoderKL.from_pretrained(Path(config.shared) / "vae").eval()
    shift = float(shared["latent_mean"]) if family_name == "sd3" else None
    vae.register_to_config(shift_factor=shift)
    out = Path(config.out_dir)
    check_replaceable(out, "text_base.out_dir", "embedded default: tiny", BASE_ENTRIES, "a text_base output")
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_pipeline(family_name, config, vae, Path(scratch))
        losses, latents, captions = fit_on_digits(family_name, pipe, shared["x_train"], shared["y_train"],
                                                  shared["w_train"], config, progress)
        # written next to out_dir, then swapped in: a killed run leaves the previous pipeline whole
        staging = staging_folder(out)
        pipe.save_pretrained(staging)
    for name in ("classifier", PROMPTS_DIR):
        shutil.copytree(Path(config.shared) / name, staging / name)
    np.savez_compressed(staging / "holdout.npz", images=shared["x_hold"], labels=shared["y_hold"])
    write_real_pairs(staging / REAL_PAIRS, latents, shared)
    net = denoiser_of(pipe)
    meta = {"description": f"embedded default: tiny {family.title} pipeline on captioned 16x16 digits",
            "final_loss": float(np.mean(losses[-100:])), "parameters": sum(p.numel() for p in net.parameters()),
            "captions": len(captions)}
    if family_name == "sd3":  # no T5: its part of the prompt is MAX_TOKENS of zero padding, not 256
        meta["max_sequence_length"] = MAX_TOKENS
    (staging / "agd_base.json").write_text(json.dumps(meta, indent=2) + "\n")
    swap_in(staging, out)
    return meta


def denoiser_of(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def fit_on_digits(family_name: str, pipe, images: np.ndarray, labels: np.ndarray, weights: np.ndarray, config,
                  progress: bool, parameters: list | None = None, desc: str = "") -> tuple[list[float], torch.Tensor,
                                                                                            list[str]]:
    """Train the pipeline's denoiser on digit images with ``config.captions_per_image`` generated captions
    each (``parameters``: what is trained, default every weight of the denoiser). Returns (losses, the
    images' latents, the captions). What text_base trains a default with, and finetune a derivative."""
    from agd_pipeline import families

    family = families.get(family_name)
    captions, owners = caption_set(labels, weights, config.seed, config.captions_per_image, config.agnostic_share)
    table, uncond = encode_captions(pipe, family, captions)
    latents = digit_latents(pipe.vae, images)
    losses = _fit(family, denoiser_of(pipe), latents, owners, table, uncond, pipe.scheduler, config, progress,
                  parameters, desc or f"text_base: train {family.name}")
    return losses, latents, captions


@torch.no_grad()
def digit_latents(vae, images: np.ndarray) -> torch.Tensor:
    """The VAE's latents of 1-channel digit images in [-1, 1], scaled (and shifted, SD3) as the pipeline
    expects them."""
    rgb = torch.from_numpy(np.asarray(images, dtype=np.float32)).expand(-1, 3, -1, -1)
    z = vae.encode(rgb).latent_dist.mean
    return (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def load_pipeline(folder: str | Path):
    """A text_base (or finetune) output as its diffusers pipeline; components it leaves out (SD's safety
    checker, SD3's T5) stay None."""
    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
    return DiffusionPipeline.from_pretrained(folder, **absent)


def base_recipe(folder: str | Path) -> dict:
    """The ``text_base`` settings a default was trained with (its resolved_config.json), which a
    derivative is fine-tuned with too."""
    path = Path(folder) / "resolved_config.json"
    try:
        recipe = json.loads(path.read_text())["text_base"]
        for key in ("family", "shared", "captions_per_image", "agnostic_share", "flow_shift"):
            recipe[key]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: cannot read the text_base settings this base was trained with ({err!r}); "
                         f"finetune derives from an embedded text default (`{command_line('text_base')}` "
                         "writes it)") from None
    return recipe


REAL_PAIRS = "train.npz"  # generate.real_data of the forward-noised ablation


def write_real_pairs(path: Path, latents: torch.Tensor, shared: dict) -> None:
    """The training prompts' own images as the family's latents, with the prompts as captions:
    ``generate.source forward_noised`` noises, for each training prompt, the image it captions
    (standard guidance distillation's data, on the same prompts as stage one's trajectories)."""
    from agd_pipeline.models import read_prompts

    prompts = read_prompts(path.parent / PROMPTS_DIR / TRAIN_PROMPTS)
    images = shared.get("train_prompt_images")
    if images is None or len(images) != len(prompts):
        raise ModelError(f"{path.parent}: the shared data does not say which image each of the {len(prompts)} "
                         "training prompts captions (written before forward-noised text data existed?); run "
                         f"the text pipeline's data stage (`{command_line('text_data')}`) again")
    np.savez_compressed(path, latents=latents[torch.from_numpy(images)].numpy().astype(np.float32),
                        captions=np.asarray(prompts, dtype=str))


# what a text_base output folder holds; a folder with anything else is not replaced
BASE_ENTRIES = {"model_index.json", "agd_base.json", "resolved_config.json", "holdout.npz", REAL_PAIRS, "classifier",
                PROMPTS_DIR,
                "scheduler", "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                "tokenizer_2"}


def _fit(family, net, latents, owners, table, uncond, scheduler, config, progress, parameters, desc) -> list[float]:
    """Denoising training on (latent, caption) pairs with caption dropout to the empty prompt; the
    trained weights (``parameters``, or every weight of ``net``) end as their exponential moving average."""
    from diffusers.training_utils import EMAModel

    flow = "FlowMatch" in type(scheduler).__name__
    alphas = None if flow else scheduler.alphas_cumprod
    net.train()
    if parameters is None:
        net.requires_grad_(True)
        parameters = list(net.parameters())
    ema = EMAModel(parameters, decay=config.ema_decay)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.train_steps, max(1, config.train_steps // 20)))
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    image_of = torch.from_numpy(owners)
    bar = tqdm(range(config.train_steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        pick = torch.randint(0, len(owners), (config.batch_size,), generator=gen)
        x0 = latents[image_of[pick]]
        drop = torch.rand(config.batch_size, generator=gen) < config.caption_dropout
        cond = {}
        for name, rows in table.items():
            picked = rows[pick]
            cond[name] = torch.where(drop.view(-1, *[1] * (picked.dim() - 1)), uncond[name].expand_as(picked), picked)
        noise = torch.randn(x0.shape, generator=gen)
        if flow:
            u = torch.rand(config.batch_size, generator=gen)
            sigma = (config.flow_shift * u / (1 + (config.flow_shift - 1) * u)).view(-1, 1, 1, 1)
            x_t, target, t = (1 - sigma) * x0 + sigma * noise, noise - x0, sigma.flatten() * 1000
        else:
            t = torch.randint(0, len(alphas), (config.batch_size,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            x_t, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
        loss = F.mse_loss(family.predict(net, x_t, t, cond), target)
        losses.append(descent_step(loss, parameters, optimizer, schedule, ema, what=desc, step=step))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    ema.copy_to(parameters)
    net.eval().requires_grad_(False)
    return losses
