"""Image decoding and the two spatial transforms: RandomResizedCrop (train) and resize + centre crop (eval).

Both transforms are one PIL `resize(box=...)` call: the crop box is chosen on the source image and
PIL resamples only that region to the target size. The same box logic serves every frame of a video.
Training may add a horizontal flip (every frame alike) and, for images, timm's RandAugment (`Augment`).
"""
from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation (the vision tower starts from CLIP weights), as [3, 1, 1] for CHW arrays.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32).reshape(3, 1, 1)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32).reshape(3, 1, 1)

# The same on 0..255 pixels in HWC order, folded into one subtraction and one multiplication.
_MEAN_255 = (CLIP_MEAN * 255).reshape(3)
_INV_STD_255 = (1 / (CLIP_STD * 255)).reshape(3)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 40_000_000  # data.max_image_pixels' default: larger images are skipped before decoding


class TooManyPixels(ValueError):
    """An image whose header announces more pixels than the limit (a decompression bomb, or a scan)."""


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PIL image from encoded bytes, its pixel count checked from the header before anything decodes
    (a 165 KiB PNG can announce 12000 x 12000 pixels)."""
    img = Image.open(io.BytesIO(data))
    if max_pixels and img.size[0] * img.size[1] > max_pixels:
        raise TooManyPixels(f"{img.size[0]}x{img.size[1]} pixels, over data.max_image_pixels={max_pixels}")
    return img

Box = tuple[float, float, float, float]

# timm's RandAugment operations without Invert, as the released fine-tuning's RandAugment list.
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
                   "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class Augment:
    """A training sample's augmentation (evaluation uses none: resize + centre crop).
    `scale`: RandomResizedCrop's area range; `hflip`: flip half the samples; `randaugment`: a timm
    RandAugment config string for images ("" = off)."""
    scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = False
    randaugment: str = ""

    @classmethod
    def of(cls, data_cfg) -> "Augment":
        return cls(tuple(data_cfg.crop_scale), data_cfg.hflip, data_cfg.randaugment)


class _KeyedRandAugment:
    """timm's RandAugment drawn from a sample's own generator: timm draws from the global `random`
    and NumPy states, so they are seeded from `rng` for the call and restored after it (a resumed
    run augments alike, and the trainer's global RNG is left as it was)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        saved = random.getstate(), np.random.get_state()
        seed = rng.getrandbits(32)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


@functools.lru_cache(maxsize=8)
def randaugment(config: str) -> _KeyedRandAugment:
    """timm's RandAugment for a config string such as "rand-m3-n2-p1.0" (ValueError when malformed)."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        return _KeyedRandAugment(rand_augment_transform(config, None, transforms=list(RANDAUGMENT_OPS)))
    except (AssertionError, ValueError, IndexError) as err:
        raise ValueError(f"data.randaugment={config!r} is not a timm RandAugment string such as "
                         f"'rand-m3-n2-p1.0' ({type(err).__name__}: {err})") from None


def random_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """torchvision's RandomResizedCrop.get_params: a box of `scale` of the area and aspect in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    return center_crop_box(width, height)  # extreme aspect ratios: fall back like torchvision


def center_crop_box(width: int, height: int) -> Box:
    """The centred square: resizing it to size x size equals resize-shorter-side + centre crop."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def crop_resize(images: list[Image.Image], box: Box, size: int, flip: bool = False) -> np.ndarray:
    """Crop `box` from every frame, resize to size x size (mirrored left-right when `flip`),
    normalise -> float32 [T, 3, size, size].

    NumPy rather than torch: torch's intra-op threads make these small per-sample ops ~100x
    slower when the cores are busy (and the loader runs exactly where they are). Normalised per
    channel on all frames at once: broadcasting over a last axis of 3 is several times slower.
    """
    pixels = np.stack([np.asarray(img.resize((size, size), Image.BICUBIC, box=box)) for img in images])
    if flip:
        pixels = pixels[:, :, ::-1]
    chw = pixels.transpose(0, 3, 1, 2)  # [T, 3, H, W], a view of the uint8 pixels
    out = np.empty(chw.shape, np.float32)
    for c in range(3):
        np.subtract(chw[:, c], _MEAN_255[c], out=out[:, c], dtype=np.float32)
        out[:, c] *= _INV_STD_255[c]
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own convert clips 16-bit and 32-bit grey (0..65535) at 255, which turns
    a 16-bit PNG white: those are scaled to 0..255 first. Float grey ("F") is taken as 0..1 when
    no value exceeds 1, else as 0..255 (PIL's convention)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        x = np.asarray(img, dtype=np.float32)
        if img.mode != "F":
            x = x * (255 / 65535)
        elif x.size and np.nanmax(x) <= 1:
            x = x * 255
        img = Image.fromarray(np.clip(np.nan_to_num(x) + 0.5, 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def augmented_crop(images: list[Image.Image], size: int, rng: random.Random | None, aug: Augment) -> np.ndarray:
    """The crop (random with `rng`, else centred) and flip of a sample's frames -> [T, 3, size, size]."""
    if rng is None:
        return crop_resize(images, center_crop_box(*images[0].size), size)
    box = random_crop_box(*images[0].size, aug.scale, rng)
    return crop_resize(images, box, size, flip=aug.hflip and rng.random() < 0.5)


def decode_image(data: bytes, size: int, rng: random.Random | None = None, aug: Augment = Augment(),
                 max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Encoded image -> [3, size, size]; augmented when `rng` is given, else centre crop (eval).

    JPEGs are decoded at a reduced scale (PIL `draft`) when even the smallest training crop would
    still cover `size` pixels, which saves most of the decode time for large photos.
    """
    img = open_image(data, max_pixels)
    if img.format == "JPEG":
        need = math.ceil(size / math.sqrt(aug.scale[0])) if rng is not None else size
        img.draft("RGB", (need, need))
    img.load()  # the full decode: corrupt data raises here
    img = to_rgb(img)
    if rng is not None and aug.randaugment:
        img = randaugment(aug.randaugment)(img, rng)
    return torch.from_numpy(augmented_crop([img], size, rng, aug)[0])
