"""Image and video decoding: crops, normalisation, frame sampling (PIL and PyAV on real encoded data)."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import image_bytes, video_bytes
from pipeline.data.image import CLIP_MEAN, CLIP_STD, decode_image, random_crop_box
from pipeline.data.video import decode_video, frame_indices


def grey_of(pixels: torch.Tensor) -> float:
    """Undo CLIP normalisation of a flat grey picture -> its 0..255 level."""
    x = pixels.numpy() * CLIP_STD + CLIP_MEAN
    return float(x.mean() * 255)


def test_image_eval_is_centre_crop_and_normalised():
    # Left half black, right half white, 80x40: the centre 40x40 square is half black, half white.
    img = Image.new("RGB", (80, 40))
    img.paste((255, 255, 255), (40, 0, 80, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = decode_image(buf.getvalue(), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    level = x.numpy() * CLIP_STD + CLIP_MEAN
    assert level[:, :, :7].max() < 0.05 and level[:, :, 9:].min() > 0.95
    assert torch.equal(x, decode_image(buf.getvalue(), 16))  # deterministic


def test_image_train_crop_is_random_but_seeded():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, format="PNG")
    a = decode_image(buf.getvalue(), 32, random.Random(1))
    b = decode_image(buf.getvalue(), 32, random.Random(1))
    c = decode_image(buf.getvalue(), 32, random.Random(2))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_box_respects_scale_and_bounds():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(200, 100, (0.5, 1.0), rng)
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        area = (right - left) * (bottom - top) / (200 * 100)
        assert 0.45 <= area <= 1.0


def test_large_jpeg_uses_draft_and_keeps_content():
    big = image_bytes(200, size=(1600, 1200))
    x = decode_image(big, 64, random.Random(0))
    assert x.shape == (3, 64, 64) and abs(grey_of(x) - 200) < 3
    img = Image.open(io.BytesIO(big))
    img.draft("RGB", (72, 72))  # what decode_image asks for at 64 px and the default scale 0.8
    assert img.size[0] < 1600  # so the JPEG really was decoded at a reduced scale


@pytest.mark.parametrize("n", [1, 3, 4, 10, 97])
def test_frame_indices_eval_uniform_and_train_per_segment(n):
    t = 4
    eval_idx = frame_indices(n, t)
    assert eval_idx == [min(n - 1, int((i + 0.5) * n / t)) for i in range(t)]
    assert eval_idx == sorted(eval_idx)
    rng = random.Random(0)
    for _ in range(50):
        idx = frame_indices(n, t, rng)
        assert len(idx) == t and idx == sorted(idx)
        for i, k in enumerate(idx):
            # each index lies in its own segment [i*n/t, (i+1)*n/t), clamped to the last frame
            assert int(i * n / t) <= k <= min(n - 1, int((i + 1) * n / t))
    if n < t:  # short videos repeat frames rather than failing
        assert len(set(eval_idx)) == n


def test_frame_indices_train_covers_each_segment():
    rng = random.Random(0)
    seen = {i: set() for i in range(4)}
    for _ in range(400):
        for i, k in enumerate(frame_indices(40, 4, rng)):
            seen[i].add(k)
    assert all(seen[i] == set(range(10 * i, 10 * i + 10)) for i in range(4))


@pytest.mark.parametrize("gop", [1, 4, 100])
def test_video_decodes_the_sampled_frames(gop):
    levels = [10 + 8 * t for t in range(30)]  # frame t has grey level 10 + 8t
    data = video_bytes(levels, gop=gop)
    x = decode_video(data, 4, 16)  # eval: middle frame of each of 4 segments
    assert x.shape == (4, 3, 16, 16)
    want = [levels[i] for i in frame_indices(30, 4)]
    got = [grey_of(f) for f in x]
    assert np.allclose(got, want, atol=3), (got, want)
    # training: frames from the seeded per-segment choice, same crop on every frame
    rng_a, rng_b = random.Random(5), random.Random(5)
    y = decode_video(data, 4, 16, rng_a)
    want = [levels[i] for i in frame_indices(30, 4, rng_b)]
    assert np.allclose([grey_of(f) for f in y], want, atol=3)


def test_short_video_repeats_frames():
    x = decode_video(video_bytes([30, 130, 230]), 4, 16)
    got = [round(grey_of(f)) for f in x]
    assert len(got) == 4 and np.allclose(got, [30, 130, 130, 230], atol=3)


def test_corrupt_video_raises():
    good = video_bytes([50] * 8)
    with pytest.raises(Exception):
        decode_video(good[: len(good) // 3] + bytes(200), 4, 16)
    with pytest.raises(Exception):
        decode_video(b"not a video at all", 4, 16)


def test_train_flip_mirrors_half_the_samples_and_randaugment_is_keyed():
    from pipeline.data.image import Augment

    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:, :20] = 255  # white left half
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    whole = Augment(scale=(1.0, 1.0), hflip=True)
    lefts = []
    for seed in range(40):
        x = decode_image(data, 16, random.Random(seed), whole)
        lefts.append(float(x[:, :, :8].mean()) > float(x[:, :, 8:].mean()))
    assert 10 < sum(lefts) < 30  # about half mirrored
    assert all(float(decode_image(data, 16, random.Random(s), Augment(scale=(1.0, 1.0)))[:, :, :8].mean())
               > 0 for s in range(5))  # no flip asked: the white half stays left
    # RandAugment (timm's): the same sample key gives the same image, the global RNGs are left alone
    ra = Augment(scale=(1.0, 1.0), randaugment="rand-m3-n2-p1.0")
    random.seed(5)
    np.random.seed(5)
    before = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    outs = [decode_image(data, 32, random.Random(s), ra) for s in (1, 1, 2, 3, 4, 5)]
    assert (random.random(), np.random.rand()) == before
    assert torch.equal(outs[0], outs[1])
    assert len({o.numpy().tobytes() for o in outs}) > 2  # other keys, other operations
    with pytest.raises(ValueError, match="not a timm RandAugment string"):
        from pipeline.data.image import randaugment
        randaugment("rand-q9")
