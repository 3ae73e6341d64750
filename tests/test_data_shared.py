"""Real data from ../shared/data (COCO images with five captions, WebVid h264 clips) through the loader.

Skips cleanly where the folder is absent (a fresh checkout).
"""
import io
import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
from webdataset import TarWriter

from data_fixtures import tiny_config
from pipeline.data import build_eval_samples, build_train_loader, train_tokenizer
from pipeline.data.image import Augment, center_crop_box, crop_resize, random_crop_box
from pipeline.data.video import decode_video, frame_indices

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.shared


def rows(name: str):
    path = SHARED / name / "captions.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (real sample data lives in ../shared beside the checkout)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    chosen = rows("coco_239")[:12]
    out = tmp_path_factory.mktemp("coco")
    for shard in range(2):
        with TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for r in chosen[6 * shard: 6 * shard + 6]:
                sink.write({"__key__": f"{r['coco_id']:012d}", "jpg": (SHARED / "coco_239" / r["image"]).read_bytes(),
                            "txt": r["captions"][0], "json": json.dumps({"captions": r["captions"]}).encode()})
    (out / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 6}))
    tok = train_tokenizer([c for r in rows("coco_239") for c in r["captions"]], out / "tok", vocab_size=1000)
    return out, chosen, tok


def test_coco_images_train_and_eval(coco):
    out, chosen, tok = coco
    cfg = tiny_config([dict(name="coco", shards=str(out / "{00000..00001}.tar"))], sharding="split", workers=2,
                      batch_size=2, image_size=64)
    cfg.model.text.max_len = 32
    loader = build_train_loader(cfg, 0, 1, tok)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"{r['coco_id']:012d}" for r in chosen) and loader.counters() == {}
    b = batches[0]
    assert b["pixels"].shape == (2, 1, 3, 64, 64) and b["pixels"].isfinite().all()
    assert 0.3 < float(b["pixels"].std()) < 3  # real photos, normalised
    words = tok.decode(b["text_ids"][0], skip_special_tokens=True).lower().split()
    by_key = {f"{r['coco_id']:012d}": r for r in chosen}
    assert " ".join(words) in [c.lower().strip() for c in by_key[b["keys"][0]]["captions"]]

    samples = list(build_eval_samples(str(out / "{00000..00001}.tar"), "image", cfg))
    assert [k for k, _, _ in samples] == [f"{r['coco_id']:012d}" for r in chosen]
    assert all(c == [x.strip() for x in by_key[k]["captions"]] and len(c) == 5 for k, _, c in samples)
    again = next(iter(build_eval_samples(str(out / "00000.tar"), "image", cfg)))
    assert (again[1] == samples[0][1]).all()


@pytest.fixture(scope="module")
def webvid(tmp_path_factory):
    clips = sorted(rows("webvid_9"), key=lambda r: (SHARED / "webvid_9" / r["video"]).stat().st_size)[:3]
    out = tmp_path_factory.mktemp("webvid")
    with TarWriter(str(out / "00000.tar")) as sink:
        for r in clips:
            sink.write({"__key__": Path(r["video"]).stem, "mp4": (SHARED / "webvid_9" / r["video"]).read_bytes(),
                        "txt": r["caption"]})
    (out / "sizes.json").write_text(json.dumps({"00000.tar": 3}))
    return out, clips


def test_webvid_clips_train_and_eval(webvid, tmp_path):
    out, clips = webvid
    tok = train_tokenizer([r["caption"] for r in clips], tmp_path / "tok", vocab_size=400)
    cfg = tiny_config([dict(name="webvid", shards=str(out / "00000.tar"), modality="video")], sharding="split",
                      workers=0, batch_size=1, video_size=32, num_frames=4)
    loader = build_train_loader(cfg, 0, 1, tok)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(Path(r["video"]).stem for r in clips)
    assert all(b["pixels"].shape == (1, 4, 3, 32, 32) and b["modality"] == "video" for b in batches)
    assert all(float((b["pixels"][0, 0] - b["pixels"][0, -1]).abs().mean()) > 0.01 for b in batches)  # motion
    samples = list(build_eval_samples(str(out / "00000.tar"), "video", cfg))
    assert [c for _, _, c in samples] == [[r["caption"].strip()] for r in clips]


def test_webvid_seeking_decoder_matches_sequential_decoding(webvid):
    _, clips = webvid
    data = (SHARED / "webvid_9" / clips[-1]["video"]).read_bytes()
    for rng_seed in (None, 3):
        rng = random.Random(rng_seed) if rng_seed is not None else None
        got = decode_video(data, 4, 48, rng).numpy()
        # reference: decode every frame in order and keep the chosen ones
        with av.open(io.BytesIO(data)) as c:
            n = sum(1 for p in c.demux(c.streams.video[0]) if p.pts is not None and p.size)
        ref_rng = random.Random(rng_seed) if rng_seed is not None else None
        idx = frame_indices(n, 4, ref_rng)
        with av.open(io.BytesIO(data)) as c:
            frames = {i: f.to_image() for i, f in enumerate(c.decode(c.streams.video[0])) if i <= max(idx)}
        assert n > 100 and all(i in frames for i in idx)
        size = frames[idx[0]].size
        box = center_crop_box(*size) if ref_rng is None else random_crop_box(*size, Augment().scale, ref_rng)
        want = np.stack([crop_resize([frames[i]], box, 48)[0] for i in idx])
        assert np.array_equal(got, want)
