"""Synthetic media shared by the benchmarks."""
import io

import numpy as np
from PIL import Image


def photo(rng) -> bytes:
    """A 640x480 JPEG with smooth structure and grain: it decodes and resizes like a photo, unlike noise."""
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    img = np.stack([np.sin(x / rng.uniform(20, 80)) * 80 + 120, np.cos(y / rng.uniform(20, 80)) * 80 + 120,
                    (x + y) / 1120 * 255], -1) + rng.normal(0, 12, (480, 640, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
