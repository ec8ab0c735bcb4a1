"""The data layer shared by the training scripts: built-in data sets, Hub data sets and image folders.

Every data set comes out as a :class:`DatasetSplits`: a train and a held-out validation
``torch.utils.data.Dataset`` whose items are

    {"pixel_values": FloatTensor (C, H, W) in [-1, 1],  "class_labels": LongTensor scalar}

(``class_labels`` only with ``use_labels=True``), i.e. x0 as the diffusion losses expect it.

Sources (exactly one per call of :func:`prepare_datasets`):

* built-ins (:data:`BUILTIN_DATASETS`): ``"digits"`` (scikit-learn, 1797 8x8 images) and
  ``"fashion_mnist"`` (the gzipped IDX training files of the ``dataset-fashion-mnist`` package).
  They are held as one uint8 tensor `(N, 1, H, W)`, resized once up front, so iterating them is cheap.
* any other ``dataset_name``: ``datasets.load_dataset(dataset_name, dataset_config_name, split="train")``,
  after the aliases of :data:`HUB_DATASET_ALIASES` (``ffhq`` -> ``merkol/ffhq-256``, ``imagenet`` ->
  ``ILSVRC/imagenet-1k``) are resolved; an unreachable Hub fails within seconds with one clear message.
* ``train_data_dir``: a folder of images, checked by :func:`preflight_image_folder` and then loaded
  with ``datasets.load_dataset("imagefolder", ...)``.

Preprocessing follows diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
(Resize(resolution, bilinear) -> crop -> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5]))
without torchvision, and always crops at the centre (see :func:`prepare_datasets`).

Randomness: the validation split and ``max_train_samples`` use a private generator seeded with
``seed``; the random flip draws ``torch.rand(1)`` from the *global* torch RNG, once per train item
(like torchvision's ``RandomHorizontalFlip``), so ``torch.manual_seed`` makes it reproducible. With
``num_workers > 0`` each DataLoader worker has its own torch RNG seeded from the loader's generator,
which :func:`make_dataloader` seeds, so flips stay reproducible there too.

Every user-facing problem (missing files, bad images, wrong options) raises :class:`DataError`,
whose message names the file, key or value at fault.
"""

import functools
import gzip
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "BUILTIN_DATASETS",
    "HUB_DATASET_ALIASES",
    "resolve_dataset_name",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "DatasetSplits",
    "DEFAULT_BACKGROUND",
    "decode_image",
    "explain_missing_folder_labels",
    "has_transparency",
    "is_grey_image",
    "parse_background_color",
    "preflight_image_folder",
    "prepare_datasets",
    "make_dataloader",
    "infinite_batches",
]


class DataError(ValueError):
    """A user-facing data problem; the message names the file, key or value at fault."""


BUILTIN_DATASETS = ("digits", "fashion_mnist")
_BUILTIN_ALIASES = {"digits": "digits", "fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist"}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "NOISE_RATER_FASHION_MNIST_DIR"
_FASHION_MNIST_IMAGES = "train-images-idx3-ubyte.gz"
_FASHION_MNIST_LABELS = "train-labels-idx1-ubyte.gz"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}

_CLASS_NAMES = {
    "digits": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


# ----------------------------------------------------------------------------------------------
# Decoding: high bit depth, transparency, palettes
# ----------------------------------------------------------------------------------------------

#: Background that transparent pixels are composited onto unless told otherwise (RGB, 0..255).
DEFAULT_BACKGROUND = (255, 255, 255)

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def parse_background_color(spec) -> Tuple[int, int, int]:
    """``"white"``, ``"black"``, any colour name or ``#rrggbb`` PIL knows, or ``"R,G,B"`` (0..255) -> `(R, G, B)`.

    Raises:
        DataError: the value is not a colour.
    """
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        values = tuple(spec)
    else:
        text = str(spec).strip()
        if "," in text and not text.lower().startswith(("rgb", "hsl", "hsv")):
            try:
                values = tuple(int(v) for v in text.split(","))
            except ValueError:
                values = ()
        else:
            from PIL import ImageColor

            try:
                values = ImageColor.getrgb(text)[:3]
            except ValueError:
                values = ()
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise DataError(
            f"background colour {spec!r} is not a colour: use a name (white, black, ...), #rrggbb or R,G,B in 0..255."
        )
    return tuple(int(v) for v in values)


def has_transparency(image: Image.Image) -> bool:
    """True for modes with an alpha band (RGBA, LA, PA, ...) and for images with a ``transparency`` entry
    (palette images with a tRNS entry, or a transparent colour key in L / RGB)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def is_grey_image(image: Image.Image) -> bool:
    """True for grey modes (1, L, LA, I;16, I, F) and for palette images whose used colours are all grey."""
    if image.mode in _GREY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        colours = image.getcolors(maxcolors=256) if image.mode == "P" else image.getchannel(0).getcolors(256)
        used = [index for _, index in (colours or [])]
        for index in used:
            r, g, b = palette[3 * index: 3 * index + 3] or (0, 0, 0)
            if not r == g == b:
                return False
        return True
    return False


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """A high-bit-depth grey image -> 8-bit ``"L"``, scaled by the range of its type, never clipped.

    * ``I;16*`` (16-bit unsigned): v8 = round(v16 / 257), i.e. 0..65535 -> 0..255 (65535 = 255 * 257).
    * ``I`` (32-bit signed integers): Pillow's mode for 16-bit data in several formats (TIFF, PGM);
      the range 0..65535 is assumed and scaled like ``I;16``. A pixel outside it raises, since no
      range of the type itself (-2^31..2^31-1) would give a visible image.
    * ``F`` (32-bit float): the range 0..1 is assumed (v8 = round(255 v)); a pixel outside raises.

    Raises:
        DataError: pixel values outside the assumed range (the message gives the range found).
    """
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        low, high, scale = 0, 65535, 257.0
    else:  # "F"
        low, high, scale = 0.0, 1.0, 1.0 / 255.0
    found_min, found_max = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if not (np.isfinite(found_min) and np.isfinite(found_max)) or found_min < low or found_max > high:
        raise DataError(
            f"mode {image.mode!r} pixel values span {found_min:g}..{found_max:g}, outside the assumed range "
            f"{low}..{high}; rescale the image to 8 or 16 bits (nothing is clipped)."
        )
    return Image.fromarray(np.rint(array.astype(np.float64) / scale).astype(np.uint8), mode="L")


def decode_image(image: Image.Image, mode: str,
                 background: Tuple[int, int, int] = DEFAULT_BACKGROUND) -> Tuple[Image.Image, bool]:
    """Convert a PIL image to the 8-bit ``mode`` the model uses (``"L"`` or ``"RGB"``) keeping the pixels' meaning.

    * high-bit-depth grey modes are scaled by their range (see :func:`_high_bit_depth_to_l`), not clipped
      as ``Image.convert`` does (it maps every 16-bit value above 255 to 255);
    * images with transparency (:func:`has_transparency`) are alpha-composited onto ``background``
      (``out = a * colour + (1 - a) * background``, Porter & Duff "over"), so a transparent pixel
      shows the background instead of whatever colour it happens to store;
    * everything else goes through ``Image.convert(mode)`` (grey -> RGB repeats the grey; RGB -> L
      uses ITU-R 601-2 luma).

    Args:
        image: any image Pillow opened.
        mode: ``"L"`` or ``"RGB"``.
        background: `(R, G, B)` in 0..255 for transparent pixels (converted to luma for ``"L"``).

    Returns:
        ``(image in mode, composited)``, ``composited`` True when transparency was flattened.

    Raises:
        DataError: pixel values outside the assumed range of a high-bit-depth mode.
    """
    composited = False
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_l(image)
    elif has_transparency(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        image = Image.alpha_composite(canvas, rgba).convert("RGB")
        composited = True
    if image.mode != mode:
        image = image.convert(mode)
    return image, composited


# ----------------------------------------------------------------------------------------------
# Image folder preflight
# ----------------------------------------------------------------------------------------------


def _is_skipped_name(name: str) -> bool:
    """Hidden (``.x``) and special (``__x``) files and folders, which ``datasets`` also skips."""
    return name.startswith(".") or name.startswith("__")


def preflight_image_folder(path, expected_channels: Optional[int] = None,
                           allow_mixed_channels: bool = False,
                           background_color=DEFAULT_BACKGROUND) -> List[str]:
    """Check an image folder before any model is built, and list its images.

    Walks ``path`` recursively (skipping hidden ``.x`` and special ``__x`` files and folders, as
    ``datasets`` does). Files with an image extension (:data:`IMAGE_EXTENSIONS`, any case) must be
    non-empty, fully loadable by PIL (``Image.open(...).load()``) and decodable by :func:`decode_image`
    to the model's mode (high-bit-depth values in range); other files (``.txt``, ``metadata.csv``,
    ...) are ignored. A folder that mixes grey and colour images (e.g. some ``"L"``, some ``"RGB"``;
    palette images whose colours are all grey count as grey) is an error, since it is usually a data
    bug; with ``allow_mixed_channels=True`` it is only logged and every image is converted to
    ``expected_channels``. Logged as warnings: other mixed modes (``"RGB"`` and ``"RGBA"``), how many
    images have transparency (composited onto ``background_color``), and, with
    ``expected_channels=3``, a folder whose images are all grey (3 identical channels).

    Args:
        path (`str` or `os.PathLike`): the folder.
        expected_channels (`int`, *optional*): channels the model is configured for (1 or 3).
        allow_mixed_channels (`bool`): accept a mix of grey and colour images (converted when loaded).
        background_color: what transparent pixels are composited onto (see :func:`parse_background_color`).

    Returns:
        `List[str]`: the sorted paths of all image files.

    Raises:
        DataError: the folder is missing or not a folder, holds no image file, or holds bad image
            files -- then the message lists *all* of them, one per line, with the reason.
    """
    if expected_channels is not None and expected_channels not in _MODE_FOR_CHANNELS:
        raise DataError(f"expected_channels must be 1 or 3 (or None), got {expected_channels!r}.")
    background = parse_background_color(background_color)
    root = os.fspath(path)
    if not os.path.exists(root):
        raise DataError(f"Training data folder does not exist: {root}")
    if not os.path.isdir(root):
        raise DataError(f"Training data path is not a folder: {root}")

    candidates, ignored = _walk_folder(root)
    target_mode = _MODE_FOR_CHANNELS.get(expected_channels)
    good, bad, modes, grey_files, colour_files, composited = [], [], Counter(), [], [], []
    for file in candidates:
        problem, info = _check_image_file(file, target_mode, background)
        if problem is None:
            good.append(file)
            modes[info["mode"]] += 1
            (grey_files if info["grey"] else colour_files).append(file)
            if info["transparent"]:
                composited.append(file)
        else:
            bad.append(f"{file}: {problem}")

    if bad:
        listing = "\n".join(f"  - {line}" for line in bad)
        raise DataError(
            f"{len(bad)} bad image file(s) in {root} (fix or remove them before training):\n{listing}"
        )
    if not good:
        note = ""
        if ignored:
            examples = ", ".join(os.path.relpath(f, root) for f in sorted(ignored)[:3])
            note = f" ({len(ignored)} non-image file(s) ignored, e.g. {examples})"
        raise DataError(
            f"No image files found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})" + note
        )
    if grey_files and colour_files and not allow_mixed_channels:
        minority = grey_files if len(grey_files) <= len(colour_files) else colour_files
        kind = "grey" if minority is grey_files else "colour"
        examples = "\n".join(f"  - {f}" for f in minority[:10])
        more = f"\n  ... and {len(minority) - 10} more" if len(minority) > 10 else ""
        raise DataError(
            f"{root} mixes channel counts: {len(grey_files)} grey and {len(colour_files)} colour image(s). "
            f"The {len(minority)} {kind} one(s):\n{examples}{more}\n"
            "Make them consistent, or pass --allow_mixed_channels to convert every image to the model's channels."
        )
    if len(modes) > 1:
        summary = ", ".join(f"{count} {mode!r}" for mode, count in sorted(modes.items()))
        target = f"; all are converted to {target_mode!r}" if target_mode else ""
        logger.warning("Image folder %s mixes image modes (%s)%s.", root, summary, target)
    if composited:
        logger.warning("Image folder %s: %d of %d image(s) have transparency and are composited onto the "
                       "background colour RGB%s (--background_color), e.g. %s.", root, len(composited), len(good),
                       background, composited[0])
    if expected_channels == 3 and not colour_files:
        logger.warning("Image folder %s: all %d image(s) are grey; training on 3 identical channels. A 1-channel "
                       "model (--num_channels 1, or in_channels=1 in the model config) learns the same images at a "
                       "third of the input size.", root, len(good))
    return good


def _walk_folder(root: str) -> Tuple[List[str], List[str]]:
    """(sorted image files, other files) under ``root``, skipping hidden / special names."""
    candidates, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_skipped_name(d))
        for name in filenames:
            if _is_skipped_name(name):
                continue
            full = os.path.join(dirpath, name)
            (candidates if name.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(full)
    return sorted(candidates), sorted(ignored)


def explain_missing_folder_labels(root) -> str:
    """Why ``datasets``' imagefolder infers no class labels for ``root`` (a sentence naming the files at fault).

    ``datasets`` labels images by their parent folder only when every image lies at the same depth
    and there are at least two such folders (and no metadata file).
    """
    root = os.fspath(root)
    images, others = _walk_folder(root)
    metadata = [f for f in others if os.path.basename(f) in ("metadata.csv", "metadata.jsonl", "metadata.parquet")]
    if metadata:
        return f"{metadata[0]} is a metadata file, so labels are not taken from folder names"
    depth = Counter(os.path.relpath(f, root).count(os.sep) for f in images)
    if len(depth) > 1:
        shallow = min(depth)
        strays = [f for f in images if os.path.relpath(f, root).count(os.sep) == shallow]
        where = "at the top level of" if shallow == 0 else f"{shallow} folder level(s) deep in"
        listing = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        return (f"the image(s) {listing} lie {where} {root} while others are in class sub-folders; labels are "
                "inferred only when every image is in a class folder at the same depth. Move or remove them")
    classes = {os.path.dirname(f) for f in images}
    if len(classes) < 2:
        return (f"all images of {root} are in one folder ({next(iter(classes), root)}); put each class in its own "
                "sub-folder (at least two)")
    return "the folder layout gives no class labels"


def _check_image_file(file: str, target_mode: Optional[str],
                      background=DEFAULT_BACKGROUND) -> Tuple[Optional[str], Optional[dict]]:
    """Return ``(why file is not a usable image or None, {"mode", "grey", "transparent"} or None)``."""
    try:
        if os.path.getsize(file) == 0:
            return "empty file (0 bytes)", None
        with Image.open(file) as im:
            im.load()
            info = {"mode": im.mode, "grey": is_grey_image(im), "transparent": has_transparency(im)}
            try:
                decode_image(im, target_mode or ("L" if info["grey"] else "RGB"), background)
            except DataError as e:
                return str(e), info
            except Exception as e:  # noqa: BLE001 - any PIL failure is a data problem
                return (f"mode {im.mode!r} cannot be converted to {target_mode or 'RGB'!r} "
                        f"({type(e).__name__}: {e})"), info
    except Exception as e:  # noqa: BLE001 - any PIL failure is a data problem
        return f"cannot be read as an image ({type(e).__name__}: {e})", None
    return None, info


# ----------------------------------------------------------------------------------------------
# Shared preprocessing
# ----------------------------------------------------------------------------------------------


def _resized_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """Output `(H, W)` of torchvision ``Resize(resolution)``: the shorter edge becomes ``resolution``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resolution, int(resolution * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop_box(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """Top-left corner of torchvision ``CenterCrop(resolution)`` (images here are never smaller)."""
    return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 `(C, H, W)` -> float32 in [-1, 1], exactly as ToTensor() + Normalize([0.5], [0.5])."""
    return x.float().div_(255.0).sub_(0.5).div_(0.5)


def _resize_center_crop_uint8(images: torch.Tensor, resolution: int, chunk: int = 4096) -> torch.Tensor:
    """Resize (shorter edge) + centre crop a uint8 batch `(N, C, h, w)` -> `(N, C, res, res)` uint8.

    Bilinear ``F.interpolate`` with ``antialias=True`` when downsampling, which approximates PIL's
    bilinear resize used by diffusers' preprocessing to within rounding. Works in chunks of
    ``chunk`` images to bound the float32 memory.
    """
    h, w = images.shape[-2:]
    new_h, new_w = _resized_size(h, w, resolution)
    if (new_h, new_w) != (h, w):
        downsampling = new_h < h or new_w < w
        out = []
        for start in range(0, images.shape[0], chunk):
            x = images[start : start + chunk].float()
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=downsampling)
            out.append(x.round_().clamp_(0, 255).to(torch.uint8))
        images = torch.cat(out) if out else images.new_empty(images.shape[:2] + (new_h, new_w))
    top, left = _center_crop_box(new_h, new_w, resolution)
    return images[..., top : top + resolution, left : left + resolution].contiguous()


def _preprocess_pil(image: Image.Image, resolution: int, mode: str,
                    background: Tuple[int, int, int] = DEFAULT_BACKGROUND) -> torch.Tensor:
    """PIL image -> uint8 `(C, res, res)`: :func:`decode_image` -> Resize(res, bilinear) -> CenterCrop(res)."""
    image, _ = decode_image(image, mode, background)
    w, h = image.size
    new_h, new_w = _resized_size(h, w, resolution)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = _center_crop_box(new_h, new_w, resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class _TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 `(N, 1 or C, H, W)` (built-in data sets).

    Item ``i``: ``{"pixel_values": (num_channels, H, W) float32 in [-1, 1], "class_labels": ()}``;
    a one-channel tensor is repeated to ``num_channels``. With ``random_flip`` the image is flipped
    horizontally when ``torch.rand(1) < 0.5`` (global torch RNG, one draw per item).
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], num_channels: int, random_flip: bool):
        self.images = images
        self.labels = labels
        self.num_channels = num_channels
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        x = _to_unit_range(self.images[index])
        if x.shape[0] != self.num_channels:
            x = x.repeat(self.num_channels, 1, 1)
        if self.random_flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        item = {"pixel_values": x}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        return item


class _HFImageDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` (or a subset of its rows) decoded and preprocessed on access.

    Item ``i`` is row ``indices[i]``: its image converted to ``mode`` (``"L"``/``"RGB"``), resized
    and centre-cropped to ``resolution``, flipped like :class:`_TensorImageDataset` with
    ``random_flip``, as float32 `(C, res, res)` in [-1, 1], plus ``class_labels`` if ``labels``.
    """

    def __init__(
        self,
        hf_dataset,
        image_column: str,
        indices: torch.Tensor,
        labels: Optional[torch.Tensor],
        resolution: int,
        mode: str,
        random_flip: bool,
        background: Tuple[int, int, int] = DEFAULT_BACKGROUND,
    ):
        self.background = background
        self.hf_dataset = hf_dataset.select_columns([image_column])
        self.image_column = image_column
        self.indices = indices
        self.labels = labels
        self.resolution = resolution
        self.mode = mode
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        row = int(self.indices[index])
        value = self.hf_dataset[row][self.image_column]
        try:
            x = _preprocess_pil(_as_pil(value), self.resolution, self.mode, self.background)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - report which row failed
            raise DataError(
                f"Row {row} of column {self.image_column!r} cannot be used as a {self.mode!r} image "
                f"({type(e).__name__}: {e})."
            ) from e
        x = _to_unit_range(x)
        if self.random_flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        item = {"pixel_values": x}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        return item


def _as_pil(value: Any) -> Image.Image:
    """A decoded ``datasets`` image cell -> PIL image (PIL, array, or ``{"bytes", "path"}`` dict)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
        return image
    array = np.asarray(value)
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # mode "I;16", scaled by decode_image
    if array.dtype != np.uint8:
        raise DataError(f"expected a PIL image, a uint8 array or a 2-D uint16 array, got {type(value).__name__} "
                        f"of {array.dtype} with shape {array.shape}")
    return Image.fromarray(array)


# ----------------------------------------------------------------------------------------------
# Built-in data sets
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits_raw() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits: uint8 `(1797, 1, 8, 8)` (0..16 scaled to 0..255) and int64 labels `(1797,)`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(images[:, None]), torch.from_numpy(digits.target.astype(np.int64))


def _read_idx_gz(path: str, magic: int, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, ``ndim`` sizes) -> uint8 array of those sizes."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"Cannot read {path} as a gzip file ({type(e).__name__}: {e}).") from e
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic number {magic:#010x} expected).")
    shape = tuple(int.from_bytes(data[4 * (k + 1) : 4 * (k + 2)], "big") for k in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected} for shape {shape}.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_dir() -> str:
    """The Fashion-MNIST folder: ``$NOISE_RATER_FASHION_MNIST_DIR`` or :data:`FASHION_MNIST_DIR`."""
    return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


def _load_fashion_mnist_raw() -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST training split: uint8 `(N, 1, 28, 28)` and int64 labels `(N,)` (cached per file version)."""
    directory = fashion_mnist_dir()
    paths = [os.path.join(directory, name) for name in (_FASHION_MNIST_IMAGES, _FASHION_MNIST_LABELS)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: looked in {directory} for {', '.join(os.path.basename(p) for p in missing)}. "
            f"install it with: apt-get install dataset-fashion-mnist "
            f"(or point ${FASHION_MNIST_ENV} at a folder holding {_FASHION_MNIST_IMAGES} and {_FASHION_MNIST_LABELS})."
        )
    stamps = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
    return _load_fashion_mnist_files(stamps)


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist_files(stamps) -> Tuple[torch.Tensor, torch.Tensor]:
    (images_path, _, _), (labels_path, _, _) = stamps
    images = _read_idx_gz(images_path, magic=0x00000803, ndim=3)
    labels = _read_idx_gz(labels_path, magic=0x00000801, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels."
        )
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Hub data sets and image folders
# ----------------------------------------------------------------------------------------------


#: Short names of public Hub copies of the data sets the design names. A full Hub id (``owner/name``) is used as is.
HUB_DATASET_ALIASES = {
    # FFHQ lives in user namespaces only; this copy is parquet, column "image", 70,000 train images at 256x256.
    "ffhq": "merkol/ffhq-256",
    # Gated: log in (`hf auth login` or `huggingface-cli login`) and accept the terms on its page first.
    # Column "image", labels in "label" (1,000 classes) for class-conditional training.
    "imagenet": "ILSVRC/imagenet-1k",
}
_GATED_DATASETS = {"ILSVRC/imagenet-1k"}
_HUB_PROBE_TIMEOUT_S = 5.0


def resolve_dataset_name(dataset_name: str) -> str:
    """``dataset_name`` with a short alias (:data:`HUB_DATASET_ALIASES`, any case) replaced by its Hub id.

    An existing local path and any other name are returned unchanged; the replacement is logged.
    """
    name = os.fspath(dataset_name)
    if name.lower() in HUB_DATASET_ALIASES and not os.path.exists(name):
        resolved = HUB_DATASET_ALIASES[name.lower()]
        logger.info("dataset_name %r resolves to %r", name, resolved)
        return resolved
    return name


def _offline_hint() -> str:
    return (
        "If the Hugging Face Hub is unreachable: set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache, pass a local image folder with "
        f"--train_data_dir, or use a built-in data set that needs no network ({', '.join(BUILTIN_DATASETS)})."
    )


def _login_hint(repo_id: str) -> str:
    return (
        f" {repo_id} is gated: run `hf auth login` (or `huggingface-cli login`) with a token of an account that has "
        f"accepted its terms at https://huggingface.co/datasets/{repo_id}."
    )


def _hub_offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _probe_hub_dataset(repo_id: str, what: str):
    """One short metadata request for ``repo_id``, so that an unreachable Hub fails in seconds (not after retries).

    Returns the ``huggingface_hub`` dataset info (None when the request failed for another reason, which
    ``datasets.load_dataset`` then reports). Raises DataError when the Hub cannot be reached or has no such data set.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return HfApi().dataset_info(repo_id, timeout=_HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as e:
        aliases = ", ".join(f"{k} -> {v}" for k, v in HUB_DATASET_ALIASES.items())
        raise DataError(
            f"Could not load the {what}: the Hugging Face Hub has no data set {repo_id!r} (or it is private and "
            f"you are not logged in: `hf auth login`). Aliases: {aliases}; built-in data sets: "
            f"{', '.join(BUILTIN_DATASETS)}."
        ) from e
    except HfHubHTTPError:
        return None  # e.g. a server error: let datasets try and report
    except Exception as e:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy errors
        raise DataError(
            f"Could not load the {what}: the Hugging Face Hub ({HfApi().endpoint}) is unreachable "
            f"({type(e).__name__}: {e}). Set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache, pass "
            f"a local image folder with --train_data_dir, or use a built-in data set that needs no network "
            f"({', '.join(BUILTIN_DATASETS)})."
        ) from e


def _load_hf_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir):
    """``datasets.load_dataset`` for a Hub/local data set or an image folder, split "train".

    Hub names go through :func:`resolve_dataset_name` (``ffhq``, ``imagenet``). Unless the Hub is in offline mode
    (``HF_HUB_OFFLINE=1``: only the local cache is used), one short request first checks that the Hub answers and
    has the data set, so that an unreachable Hub gives one clear DataError within seconds.
    """
    import datasets

    repo_id = None
    if train_data_dir is not None:
        args, kwargs = ("imagefolder",), {"data_dir": os.fspath(train_data_dir)}
        what, hint = f"image folder {os.fspath(train_data_dir)}", ""
    else:
        name = resolve_dataset_name(dataset_name)
        args, kwargs = (name, dataset_config_name), {}
        what = f"dataset {name!r}" if name == dataset_name else f"dataset {dataset_name!r} (Hub id {name!r})"
        what += f" (config {dataset_config_name!r})" if dataset_config_name else ""
        hint = ""
        if not os.path.exists(name):
            repo_id = name
            hint = " " + _offline_hint()
            if repo_id in _GATED_DATASETS:
                hint = _login_hint(repo_id) + hint
            if not _hub_offline():
                info = _probe_hub_dataset(repo_id, what)
                if info is not None and getattr(info, "gated", False) and repo_id not in _GATED_DATASETS:
                    hint = _login_hint(repo_id) + hint
    try:
        return datasets.load_dataset(*args, **kwargs, cache_dir=cache_dir, split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - wrapped into one user-facing error
        if repo_id is not None and _hub_offline():
            raise DataError(
                f"Could not load the {what}: HF_HUB_OFFLINE is set and it could not be loaded from the Hugging Face cache "
                f"({type(e).__name__}: {e}). Unset HF_HUB_OFFLINE to download it, pass a local image folder with "
                f"--train_data_dir, or use a built-in data set that needs no network ({', '.join(BUILTIN_DATASETS)})."
                + (_login_hint(repo_id) if repo_id in _GATED_DATASETS else "")
            ) from e
        raise DataError(f"Could not load the {what} ({type(e).__name__}: {e}).{hint}") from e


def _find_image_column(hf_dataset, image_column: Optional[str]) -> str:
    """``image_column`` if given, else the first ``datasets.Image`` column, else "image"/"img"."""
    import datasets

    columns = list(hf_dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise DataError(f"image_column {image_column!r} is not a column of the dataset; columns: {columns}.")
        return image_column
    for name in columns:
        if isinstance(hf_dataset.features.get(name), datasets.Image):
            return name
    for name in ("image", "img"):
        if name in columns:
            return name
    raise DataError(
        f"No image column found (no datasets.Image column, no 'image'/'img'); columns: {columns}. Pass image_column."
    )


def _hf_labels(hf_dataset, label_column: Optional[str]) -> Tuple[torch.Tensor, int, str]:
    """Labels `(N,)` int64, num_classes and the column name; DataError when there are none usable."""
    import datasets

    columns = list(hf_dataset.column_names)
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"label_column {label_column!r} is not a column of the dataset; columns: {columns}.")
    else:
        label_column = next((name for name in ("label", "labels") if name in columns), None)
        if label_column is None:
            raise DataError(
                f"use_labels=True but the dataset has no 'label'/'labels' column; columns: {columns}. "
                "Pass label_column, or train unconditionally."
            )
    feature = hf_dataset.features[label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    if not (is_class_label or is_int):
        raise DataError(f"Label column {label_column!r} has type {feature}; expected a ClassLabel or integers.")
    labels = torch.as_tensor(np.asarray(list(hf_dataset[label_column]), dtype=np.int64))
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"Label column {label_column!r} holds negative labels (e.g. {int(labels.min())}).")
    num_classes = feature.num_classes if is_class_label else (int(labels.max()) + 1 if labels.numel() else 0)
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DataError(f"Label column {label_column!r} holds label {int(labels.max())} >= {num_classes} classes.")
    return labels, num_classes, label_column


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@dataclass
class DatasetSplits:
    """The train / validation data sets and what a model needs to know about them.

    Args:
        train (`torch.utils.data.Dataset`): items ``{"pixel_values": (C, H, W) float32 in [-1, 1],
            "class_labels": () int64}`` (``class_labels`` only with ``use_labels=True``), randomly
            flipped with ``random_flip``.
        validation (`torch.utils.data.Dataset`): the held-out items, same format, never flipped.
        num_classes (`int`, *optional*): number of classes with ``use_labels=True``, else None.
        num_channels (`int`): C (1 or 3).
        resolution (`int`): H = W.
        description (`str`): one line for model cards, e.g.
            ``"fashion_mnist (54000 train / 6000 val, 28x28, 1ch)"``.
        class_names (`List[str]`, *optional*): ``class_names[i]`` names class ``i`` (``use_labels=True`` and the
            data names its classes: ``ClassLabel`` columns, image-folder class folders, the built-ins).
    """

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    num_classes: Optional[int]
    num_channels: int
    resolution: int
    description: str
    class_names: Optional[List[str]] = None


def _split_indices(
    n: int, validation_split: float, seed: int, max_train_samples: Optional[int], what: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded random train/validation row indices (each sorted), train truncated to ``max_train_samples``.

    ``round(n * validation_split)`` rows (at least 1) are held out; the validation rows do not
    depend on ``max_train_samples``, and the train rows kept are a seeded random subset.
    """
    n_val = max(1, int(round(n * validation_split)))
    if n - n_val < 1:
        raise DataError(
            f"{what} has {n} image(s): too few for a train and a validation split "
            f"(validation_split={validation_split}); need at least 1 image in each."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if max_train_samples is not None:
        train_idx = train_idx[:max_train_samples]
    return train_idx.sort().values, val_idx.sort().values


def _describe(name: str, n_train: int, n_val: int, resolution: int, num_channels: int, num_classes) -> str:
    classes = f", {num_classes} classes" if num_classes is not None else ""
    return f"{name} ({n_train} train / {n_val} val, {resolution}x{resolution}, {num_channels}ch{classes})"


def prepare_datasets(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    *,
    resolution: int,
    num_channels: int,
    center_crop: bool = False,
    random_flip: bool = False,
    validation_split: float = 0.1,
    seed: int = 0,
    max_train_samples: Optional[int] = None,
    cache_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    use_labels: bool = False,
    allow_mixed_channels: bool = False,
    background_color=DEFAULT_BACKGROUND,
) -> DatasetSplits:
    r"""Load, split and preprocess a data set for diffusion training.

    Args:
        dataset_name (`str`, *optional*): a built-in (``"digits"``, ``"fashion_mnist"`` or
            ``"fashion-mnist"``), or a name/path for ``datasets.load_dataset``.
        dataset_config_name (`str`, *optional*): the ``datasets`` configuration (Hub data sets only).
        train_data_dir (`str`, *optional*): a folder of images (sub-folders become class labels,
            as with ``datasets``' ``imagefolder``). Exactly one of ``dataset_name`` and
            ``train_data_dir`` must be given.
        resolution (`int`): output height = width. Images are resized so that their shorter edge is
            ``resolution`` (bilinear, antialiased when downsampling) and then centre-cropped.
        num_channels (`int`): 1 (images converted to ``"L"``) or 3 (``"RGB"``; grey is repeated).
        center_crop (`bool`): accepted for compatibility with diffusers' scripts. The crop is
            *always* central here (diffusers uses RandomCrop when False); it only matters for
            non-square images, since square ones are resized exactly to ``resolution``.
        random_flip (`bool`): flip train images horizontally with probability 1/2, drawing
            ``torch.rand(1)`` from the global torch RNG per item. Validation is never flipped.
        validation_split (`float`): fraction in (0, 1) of the training split held out (seeded by
            ``seed``, at least 1 image; the validation rows do not depend on ``max_train_samples``).
        seed (`int`): seed of the split and of the ``max_train_samples`` subset.
        max_train_samples (`int`, *optional*): keep a seeded random subset of this many train images.
        cache_dir (`str`, *optional*): ``datasets`` cache folder.
        image_column (`str`, *optional*): image column of a ``datasets`` data set (default: the first
            ``datasets.Image`` column, else "image" or "img").
        label_column (`str`, *optional*): label column (default: "label" or "labels").
        use_labels (`bool`): return ``class_labels`` and ``num_classes``; DataError if the data has none.
        allow_mixed_channels (`bool`): accept an image folder mixing grey and colour images.
        background_color: colour transparent pixels are composited onto (name, ``#rrggbb``, ``"R,G,B"``
            or a tuple; default white). See :func:`decode_image` for all decoding rules.

    Returns:
        :class:`DatasetSplits`.

    Raises:
        DataError: any problem with the options or the data, before training starts.
    """
    if num_channels not in _MODE_FOR_CHANNELS:
        raise DataError(f"num_channels must be 1 (greyscale) or 3 (RGB), got {num_channels!r}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}.")
    if not (isinstance(validation_split, (int, float)) and 0.0 < validation_split < 1.0):
        raise DataError(f"validation_split must be a fraction strictly between 0 and 1, got {validation_split!r}.")
    if max_train_samples is not None and (not isinstance(max_train_samples, int) or max_train_samples < 1):
        raise DataError(f"max_train_samples must be a positive integer or None, got {max_train_samples!r}.")
    if (dataset_name is None) == (train_data_dir is None):
        raise DataError(
            "Give exactly one of dataset_name and train_data_dir "
            f"(got dataset_name={dataset_name!r}, train_data_dir={train_data_dir!r})."
        )

    background = parse_background_color(background_color)
    builtin = _BUILTIN_ALIASES.get(dataset_name) if dataset_name is not None else None
    if builtin is not None:
        images, labels = _load_digits_raw() if builtin == "digits" else _load_fashion_mnist_raw()
        train_idx, val_idx = _split_indices(len(images), validation_split, seed, max_train_samples, builtin)
        keep = torch.cat([train_idx, val_idx])
        # Resize only the rows that are used (max_train_samples makes this much cheaper).
        resized = _resize_center_crop_uint8(images[keep], resolution)
        n_train = len(train_idx)
        num_classes = 10 if use_labels else None
        class_names = (list(_CLASS_NAMES[builtin]) if use_labels else None)
        train_labels = labels[train_idx] if use_labels else None
        val_labels = labels[val_idx] if use_labels else None
        train = _TensorImageDataset(resized[:n_train], train_labels, num_channels, random_flip)
        validation = _TensorImageDataset(resized[n_train:], val_labels, num_channels, False)
        name = builtin
    else:
        if train_data_dir is not None:
            preflight_image_folder(train_data_dir, expected_channels=num_channels,
                                   allow_mixed_channels=allow_mixed_channels, background_color=background)
            name = f"imagefolder:{os.fspath(train_data_dir)}"
        else:
            name = str(dataset_name)
        hf_dataset = _load_hf_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir)
        column = _find_image_column(hf_dataset, image_column)
        labels, num_classes, class_names = None, None, None
        if use_labels:
            try:
                labels, num_classes, used_column = _hf_labels(hf_dataset, label_column)
            except DataError as e:
                if train_data_dir is None or label_column is not None:
                    raise
                raise DataError(f"Cannot infer class labels for {os.fspath(train_data_dir)}: "
                                f"{explain_missing_folder_labels(train_data_dir)}. ({e})") from e
            feature = hf_dataset.features[used_column]
            names = getattr(feature, "names", None)
            class_names = list(names) if names and len(names) == num_classes else None
        train_idx, val_idx = _split_indices(len(hf_dataset), validation_split, seed, max_train_samples, name)
        mode = _MODE_FOR_CHANNELS[num_channels]
        train = _HFImageDataset(
            hf_dataset, column, train_idx, labels[train_idx] if use_labels else None, resolution, mode, random_flip,
            background,
        )
        validation = _HFImageDataset(
            hf_dataset, column, val_idx, labels[val_idx] if use_labels else None, resolution, mode, False, background
        )
        validation[0]  # fail now, not mid-training, if the images cannot be decoded/converted (no RNG used)

    return DatasetSplits(
        train=train,
        validation=validation,
        num_classes=num_classes,
        num_channels=num_channels,
        resolution=resolution,
        description=_describe(name, len(train), len(validation), resolution, num_channels, num_classes),
        class_names=class_names,
    )


def make_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = True,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed`` (its own ``torch.Generator``).

    The generator also seeds the per-worker torch RNGs when ``num_workers > 0``, so random flips
    are reproducible there too; with ``num_workers=0`` they come from the global torch RNG.

    Raises:
        DataError: ``drop_last`` with fewer items than ``batch_size`` (there would be no batch at all).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    if drop_last and len(dataset) < batch_size:
        raise DataError(
            f"The dataset has {len(dataset)} item(s), fewer than batch_size={batch_size}: with drop_last=True "
            "there would be no batch. Lower the batch size or add data."
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(int(seed)),
        drop_last=drop_last,
        num_workers=num_workers,
    )


def infinite_batches(loader: Iterable) -> Iterator[Any]:
    """Yield the batches of ``loader`` forever, epoch after epoch (reshuffled each epoch if it shuffles).

    Raises:
        DataError: an epoch yields no batch (it would otherwise loop forever).
    """
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("The data loader yielded no batch in a whole epoch (empty dataset or drop_last?).")


class ResumableBatches:
    """An endless, exactly resumable stream of batches from a map-style dataset, positioned in samples.

    The stream is the concatenation of epochs: epoch e visits the items in the order
    ``torch.randperm(n, generator=manual_seed(seed + e))`` (``arange(n)`` without ``shuffle``). Each
    step consumes the next ``batch_size * num_shards`` items of that sequence (a global batch; the
    last batch of an epoch continues into the next epoch, so no item is dropped), and process
    ``shard`` takes every ``num_shards``-th of them (``global_batch[shard::num_shards]``). The position
    is ``(epoch, position)``, ``position`` = items of epoch e consumed by all processes together, so a
    run can resume with another ``batch_size`` or ``num_shards`` (elastic resume) and still see every
    item of every epoch exactly once; :meth:`load_state_dict` then warns that the run is no longer
    bit-identical to an uninterrupted one. Random flips inside the dataset come from the global torch
    RNG, which the training scripts checkpoint separately.

    Yields dicts of stacked tensors: ``{"pixel_values": (B, C, H, W), ["class_labels": (B,)]}``.

    Raises:
        DataError: ``batch_size < 1``, or fewer than ``batch_size`` items per process.
    """

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True, shard: int = 0,
                 num_shards: int = 1):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= shard < num_shards:
            raise DataError(f"shard must be in [0, num_shards={num_shards}), got {shard}.")
        per_shard = len(dataset) // num_shards
        if per_shard < batch_size:
            raise DataError(
                f"The dataset has {len(dataset)} item(s) ({per_shard} per process over {num_shards}), fewer than "
                f"batch_size={batch_size}: there would be no batch. Lower the batch size or add data."
            )
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, int(seed), shuffle
        self.shard, self.num_shards = shard, num_shards
        self.epoch, self.position = 0, 0
        self._order = None

    @property
    def samples_per_step(self) -> int:
        """Items one step consumes over all processes: ``batch_size * num_shards``."""
        return self.batch_size * self.num_shards

    @property
    def batches_per_epoch(self) -> float:
        """Steps per epoch, ``n / (batch_size * num_shards)`` (not an integer when batches straddle epochs)."""
        return len(self.dataset) / self.samples_per_step

    def steps_for_epochs(self, num_epochs: int) -> int:
        """Steps that consume ``num_epochs`` full epochs: ``ceil(num_epochs * n / (batch_size * num_shards))``."""
        return -(-num_epochs * len(self.dataset) // self.samples_per_step)

    @property
    def samples_seen(self) -> int:
        """Items consumed since the start of the run, over all processes."""
        return self.epoch * len(self.dataset) + self.position

    def _epoch_order(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return torch.arange(n)

    def next_indices(self) -> torch.Tensor:
        """Advance by one step and return this process's dataset indices `(batch_size,)`."""
        n, need, parts = len(self.dataset), self.samples_per_step, []
        while need > 0:
            if self._order is None:
                self._order = self._epoch_order()
            take = min(need, n - self.position)
            parts.append(self._order[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return torch.cat(parts)[self.shard::self.num_shards]

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        items = [self.dataset[int(i)] for i in self.next_indices()]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shard": self.shard,
                "num_shards": self.num_shards, "batch_size": self.batch_size, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: Dict[str, int]) -> bool:
        """Resume at the saved position; returns True when the layout changed (elastic resume).

        ``state`` is a :meth:`state_dict`, or an older one that counted ``index`` in batches (its
        ``batch_size`` must then be in the dict; the scripts add it from the checkpoint's args).

        Raises:
            DataError: another seed or data set size (another data set: resuming would be meaningless),
                or an old-format state without ``batch_size``.
        """
        if int(state["seed"]) != self.seed:
            raise DataError(f"Cannot resume the data stream: checkpoint has seed={state['seed']}, "
                            f"this run has seed={self.seed}.")
        n = len(self.dataset)
        if "num_samples" in state and int(state["num_samples"]) != n:
            raise DataError(f"Cannot resume the data stream: the checkpoint's data set has {state['num_samples']} "
                            f"training items, this run's has {n} (other data or --max_train_samples?).")
        if "position" in state:
            position = int(state["position"])
        elif "batch_size" in state:  # older checkpoints: index counted in batches of the saving run
            position = int(state["index"]) * int(state["batch_size"]) * int(state["num_shards"])
        else:
            raise DataError("Cannot resume the data stream: the state counts batches ('index') but does not say "
                            "their size ('batch_size').")
        epoch = int(state["epoch"])
        if position >= n:  # an old state at the end of an epoch
            epoch, position = epoch + position // n, position % n
        self.epoch, self.position, self._order = epoch, position, None
        changed = (int(state.get("batch_size", self.batch_size)), int(state["num_shards"])) != (
            self.batch_size, self.num_shards)
        if changed:
            logger.warning(
                "Elastic resume of the data stream: the checkpoint used batch_size=%s on %s process(es), this run "
                "batch_size=%d on %d; continuing at sample %d of epoch %d, so every sample is still seen once per "
                "epoch, but the run is no longer bit-identical to an uninterrupted one.",
                state.get("batch_size"), state["num_shards"], self.batch_size, self.num_shards, position, epoch)
        return changed
