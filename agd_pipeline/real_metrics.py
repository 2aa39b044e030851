"""Evaluation metrics for real text-to-image checkpoints: clean-fid FID and CLIPScore.

``inception_fid`` and ``reference_statistics`` use clean-fid's "clean" preprocessing (PIL bicubic resize
to 299x299, float images in [0, 255]) and, by default, its Inception network. ``clip_score`` is the
CLIPScore of Hessel et al. (2021) with weight 100: the mean over images of 100 * max(cos(image, text), 0).
The per-image data behind them (``inception_features`` with ``load_reference`` and ``fid_from_features``;
``clip_scores``) give the same numbers and let the evaluate stage put bootstrap intervals on them.
Every problem with the user's files is raised as :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, os_reason, require

INCEPTION_WEIGHTS = "inception-2015-12-05.pt"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------------------------- FID


def inception_weights_path() -> Path:
    """Where clean-fid keeps (and downloads) the Inception weights: /tmp, or ./ on Windows."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_WEIGHTS


@functools.lru_cache(maxsize=4)
def _inception(device: str):
    """clean-fid's Inception feature network on ``device`` (loaded once per device)."""
    fid = require("cleanfid.fid", "FID")
    from cleanfid.downloads_helper import inception_url

    path = inception_weights_path()
    try:
        return fid.build_feature_extractor("clean", torch.device(device), use_dataparallel=False)
    except Exception as err:  # urllib/HTTP errors offline, torch.jit errors for a truncated file
        state = ("is present but cannot be loaded (delete it and fetch it again)" if path.exists()
                 else f"is missing and could not be downloaded from {inception_url}")
        raise ConfigError(f"clean-fid's Inception weights file {path} {state} ({_one_line(err)}); copy "
                          f"{INCEPTION_WEIGHTS} from a machine with network access to {path}, or pass extractor= a "
                          f"feature network of your own (reference statistics must then come from the same network)"
                          ) from None


def _image_files(folder: str | Path) -> list[str]:
    """The image files clean-fid would read from ``folder`` (recursively, hidden entries skipped), sorted."""
    EXTENSIONS = require("cleanfid.utils", "FID").EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"image folder {folder} {what}")
    extensions = {ext.lower() for ext in EXTENSIONS}
    files = sorted(str(p) for p in folder.rglob("*")
                   if p.suffix.lower()[1:] in extensions and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ConfigError(f"image folder {folder} holds no images ({', '.join(sorted(extensions))})")
    if len(files) < 2:
        raise ConfigError(f"image folder {folder} holds only one image; FID needs at least 2 (a covariance)")
    return files


def _folder_features(folder: str | Path, extractor: Callable | None, batch_size: int, device) -> np.ndarray:
    """[N, D] float64 features of the images in ``folder``, through clean-fid's "clean" preprocessing."""
    fid = require("cleanfid.fid", "FID")

    files = _image_files(folder)
    model = _inception(str(torch.device(device))) if extractor is None else extractor
    # get_files_features is what fid.get_folder_features runs on its own glob; listing the files here
    # keeps paths with glob characters working and lets us check the count first.
    try:
        feats = fid.get_files_features(files, model, num_workers=0, batch_size=batch_size,
                                       device=torch.device(device), mode="clean", verbose=False)
    except OSError as err:
        raise ConfigError(f"cannot read the images in {folder}: {_one_line(err)}") from None
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] != len(files):
        raise ConfigError(f"the feature extractor returned shape {feats.shape} for {len(files)} images of {folder}; "
                          f"it must return [batch, features]")
    if not np.isfinite(feats).all():
        raise ConfigError(f"the feature extractor returned non-finite features for the images in {folder}")
    return feats


def _statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _load_statistics(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and sigma [D, D] from a clean-fid style .npz file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise ConfigError(f"reference statistics {path} lack the array(s) {', '.join(missing)} "
                                  f"(it holds: {', '.join(data.files) or 'nothing'}); write it with "
                                  f"reference_statistics() or clean-fid")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read reference statistics {path}: {_one_line(err)}") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ConfigError(f"reference statistics {path} have mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
                          f"expected [D] and [D, D]")
    return mu, sigma


def _frechet(mu1, sigma1, mu2, sigma2, where: str) -> float:
    fid = require("cleanfid.fid", "FID")

    if mu1.shape != mu2.shape:
        raise ConfigError(f"{where}: the samples have {mu1.size} features but the reference has {mu2.size}; "
                          f"both must come from the same feature extractor")
    try:
        with warnings.catch_warnings():  # clean-fid passes scipy's deprecated sqrtm(disp=False)
            warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
            return float(fid.frechet_distance(mu1, sigma1, mu2, sigma2))
    except ValueError as err:  # clean-fid: imaginary component in sqrtm of a (near) singular product
        raise ConfigError(f"{where}: the Frechet distance is undefined ({_one_line(err)}); use more images than "
                          f"feature dimensions") from None


def inception_features(folder: str | Path, *, extractor: Callable | None = None, batch_size: int = 64,
                       device="cpu") -> np.ndarray:
    """[N, D] float64 features of the images in ``folder``, one row per image in sorted file order (what
    :func:`inception_fid` takes the mean and covariance of); ``extractor`` as there."""
    return _folder_features(folder, extractor, batch_size, device)


def load_reference(reference: str | Path, *, extractor: Callable | None = None, batch_size: int = 64,
                   device="cpu") -> dict:
    """A FID reference: ``{"features": [M, D]}`` for a folder of images, ``{"mu": [D], "sigma": [D, D]}``
    for a .npz of statistics (then only its moments are known)."""
    reference = Path(reference)
    if reference.is_file() and reference.suffix.lower() == ".npz":
        mu, sigma = _load_statistics(reference)
        return {"mu": mu, "sigma": sigma}
    _check_reference(reference)
    return {"features": _folder_features(reference, extractor, batch_size, device)}


def _check_reference(reference: Path) -> None:
    """Refuse a reference that is neither statistics nor a folder of images (before any slow features)."""
    if reference.suffix.lower() == ".npz" and not reference.exists():
        raise ConfigError(f"reference statistics {reference} do not exist")
    if reference.is_file() and reference.suffix.lower() != ".npz":
        raise ConfigError(f"reference {reference} is neither a folder of images nor a .npz file with mu and sigma")
    if not reference.is_file():
        _image_files(reference)  # a missing or empty reference folder fails before the sample features


def fid_from_features(features: np.ndarray, reference: dict, where: str = "FID") -> float:
    """FID of per-image ``features`` against a :func:`load_reference` reference: what
    :func:`inception_fid` returns for the folder the features came from."""
    mu2, sigma2 = (reference["mu"], reference["sigma"]) if "mu" in reference else _statistics(reference["features"])
    return _frechet(*_statistics(np.asarray(features, dtype=np.float64)), mu2, sigma2, where)


def inception_fid(samples: str | Path, reference: str | Path, *, extractor: Callable | None = None,
                  batch_size: int = 64, device="cpu") -> float:
    """FID between a folder of images and a reference folder or a reference .npz (arrays ``mu``, ``sigma``).

    ``extractor=None`` uses clean-fid's Inception network; otherwise a callable (e.g. a torch module, already
    on ``device``) mapping float images [B, 3, 299, 299] in [0, 255] to features [B, D].
    """
    reference = Path(reference)
    if reference.is_file() and reference.suffix.lower() == ".npz":
        stats = load_reference(reference)  # checked before the (slow) sample features
    else:
        _check_reference(reference)
        stats = None
    features = _folder_features(samples, extractor, batch_size, device)
    if stats is None:
        stats = load_reference(reference, extractor=extractor, batch_size=batch_size, device=device)
    return fid_from_features(features, stats, f"FID of {samples} against {reference}")


def reference_statistics(folder: str | Path, out_npz: str | Path, *, extractor: Callable | None = None,
                         batch_size: int = 64, device="cpu") -> Path:
    """Write mu and sigma of the features of ``folder`` to ``out_npz`` (np.savez); returns the file written."""
    mu, sigma = _statistics(_folder_features(folder, extractor, batch_size, device))
    out = Path(out_npz)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")  # what np.savez would do anyway
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, mu=mu, sigma=sigma)
    except OSError as err:
        raise ConfigError(f"cannot write reference statistics {out}: {os_reason(err)}") from None
    return out


# ---------------------------------------------------------------------------------------- CLIPScore


@functools.lru_cache(maxsize=4)
def _clip(clip_model: str, device: str):
    """(model, tokenizer, image processor) for a CLIP folder or hub id, loaded once per (path, device)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        processor = CLIPProcessor.from_pretrained(clip_model)
        model = CLIPModel.from_pretrained(clip_model).to(torch.device(device)).eval()
    except Exception as err:  # OSError for a missing folder / offline hub id, ValueError for a wrong config
        raise ConfigError(f"cannot load the CLIP model {clip_model} with transformers.CLIPModel/CLIPProcessor "
                          f"({_one_line(err)}); give a local folder holding a CLIP model, its tokenizer and "
                          f"preprocessor_config.json") from None
    return model, processor.tokenizer, processor.image_processor


def _embedding(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _as_rgb(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ConfigError(f"clip_score needs uint8 images, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"clip_score needs images [N, H, W, 3] or [N, H, W], got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def clip_scores(images, prompts: list[str], clip_model: str | Path, *, batch_size: int = 32,
                device="cpu") -> np.ndarray:
    """Per image, 100 * max(cos(image embedding, prompt embedding), 0) as float64 [N]; one prompt per image
    (:func:`clip_score` is their mean).

    ``images``: uint8 [N, H, W, 3] or grey [N, H, W]. Prompts are truncated to the text encoder's length.
    """
    return _clip_scores(images, prompts, clip_model, batch_size, device).numpy()


def clip_score(images, prompts: list[str], clip_model: str | Path, *, batch_size: int = 32, device="cpu") -> float:
    """Mean over images of 100 * max(cos(image embedding, prompt embedding), 0); one prompt per image.

    ``images``: uint8 [N, H, W, 3] or grey [N, H, W]. Prompts are truncated to the text encoder's length.
    """
    return clip_score_of(_clip_scores(images, prompts, clip_model, batch_size, device).numpy())


def clip_score_of(scores: np.ndarray) -> float:
    """The CLIP score of a sample set from its per-image :func:`clip_scores`: their mean."""
    return float(torch.from_numpy(np.asarray(scores, dtype=np.float64)).mean())


def _clip_scores(images, prompts: list[str], clip_model: str | Path, batch_size: int, device) -> torch.Tensor:
    images = _as_rgb(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ConfigError(f"clip_score got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    if not len(images):
        raise ConfigError("clip_score got no images")
    device = torch.device(device)
    key = str(Path(clip_model).resolve()) if Path(clip_model).exists() else str(clip_model)
    model, tokenizer, image_processor = _clip(key, str(device))
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            text = tokenizer(prompts[start:start + batch_size], padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt").to(device)
            pixels = image_processor(images=list(batch), input_data_format="channels_last",
                                     return_tensors="pt")["pixel_values"].to(device)
            image_embeds = _embedding(model.get_image_features(pixel_values=pixels)).float()
            text_embeds = _embedding(model.get_text_features(input_ids=text["input_ids"],
                                                             attention_mask=text["attention_mask"])).float()
            cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
            scores.append((100 * cosine.clamp(min=0)).cpu().double())
    return torch.cat(scores)
