"""Issue 12 drills on real shards: duplicate keys, shard patterns naming missing files, 16-bit PNGs,
skip counters that count bad items rather than reads."""
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from data_fixtures import caption, image_bytes, tiny_config, write_shards
from pipeline.data import DataError, build_eval_samples, build_train_loader
from pipeline.data.image import CLIP_MEAN, CLIP_STD
from pipeline.data.shards import resolve_source

DUP = 250  # grey level of every second copy of a key


def write(path, samples, sizes=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    if sizes is not None:
        (path.parent / "sizes.json").write_text(json.dumps(sizes))


def good(key, value, ext="jpg", data=None):
    return {"__key__": key, ext: data if data is not None else image_bytes(value), "txt": caption(len(key) + value)}


def grey(pixels):
    """The grey level (0..255) of a flat image after normalisation: its first channel's mean."""
    return float((pixels[..., 0, :, :].mean() * CLIP_STD[0, 0, 0] + CLIP_MEAN[0, 0, 0]) * 255)


@pytest.fixture(scope="module")
def dups(tmp_path_factory):
    """Two shards of one source: a1 again later in the first tar, a3 again in the second."""
    root = tmp_path_factory.mktemp("dups")
    write(root / "00000.tar", [good(f"a{i}", 10 * i) for i in range(6)] + [good("a1", DUP)])
    write(root / "00001.tar", [good(f"b{i}", 5 + 10 * i) for i in range(6)] + [good("a3", DUP)],
          sizes={"00000.tar": 7, "00001.tar": 7})
    return root


# ---- duplicate keys ----

def test_duplicate_keys_are_skipped_and_counted_in_training(dups, tok, caplog):
    cfg = tiny_config([dict(name="d", shards=str(dups / "{00000..00001}.tar"))], sharding="split", workers=0,
                      batch_size=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, 0, 1, tok)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(loader)
    trained = [(k, grey(b["pixels"][i])) for b in batches for i, k in enumerate(b["keys"])]
    assert len(trained) == 14 and all(level < 200 for _, level in trained), trained  # no second copy
    # 2 copies skipped; a refill that reads them again does not count them again
    assert loader.counters() == {"duplicate_key": 2}
    assert sum(sum(b["skipped"].values()) for b in batches) == 2
    assert "00000.tar #6 key a1" in caplog.text and "key already read at" in caplog.text


def test_eval_set_scores_a_key_once(dups, caplog):
    cfg = tiny_config([])
    samples = build_eval_samples(str(dups / "{00000..00001}.tar"), "image", cfg)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        got = [(k, grey(p)) for k, p, _ in samples]
    keys = [k for k, _ in got]
    assert keys == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    assert all(level < 200 for _, level in got)  # the first copy is the one kept
    assert samples.skipped == {"duplicate_key": 2}
    assert "skipped (duplicate_key)" in caplog.text and "00001.tar #6 key a3" in caplog.text
    # num_samples counts usable items only
    assert len(list(build_eval_samples(str(dups / "{00000..00001}.tar"), "image", cfg, num_samples=7))) == 7


# ---- skip counters count items, not reads ----

@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_read_again_by_a_refill_counts_once(tmp_path, tok, workers, caplog):
    # 9 samples, 4 steps of 2: with 2 slots, slot 0 reads #0..3 and slot 1 #4..7. Blocks of 1 make each
    # refill read the shard from #0 on: #0 (bad) again, in its own reader and in the other slot's.
    samples = [good(f"k{i}", 20 * i) for i in range(9)]
    for i in (0, 4):
        samples[i]["jpg"] = image_bytes(50, size=(64, 64))[:300]  # cut mid-scan
    write(tmp_path / "00000.tar", samples, sizes={"00000.tar": 9})
    cfg = tiny_config([dict(name="r", shards=str(tmp_path / "00000.tar"))], sharding="split", workers=workers,
                      batch_size=2, shuffle_buffer=1)
    loader = build_train_loader(cfg, 0, 1, tok)
    with caplog.at_level(logging.DEBUG, logger="pipeline.data"):
        batches = list(loader)
    assert len(batches) == 4 and not {"k0", "k4"} & {k for b in batches for k in b["keys"]}
    assert loader.counters() == {"corrupt_image": 2}
    assert sum(sum(b["skipped"].values()) for b in batches) == 2
    if workers == 0:  # (workers' logs do not reach caplog)
        assert "skipped (corrupt_image) again" in caplog.text  # it was read again, and not counted


def test_a_truncated_shard_drawn_again_counts_once(tmp_path, tok, caplog):
    write_shards(tmp_path, 2, 4)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) * 6 // 10])
    cfg = tiny_config([dict(name="t", shards=str(tmp_path))], sharding="resample", workers=0, batch_size=2,
                      epoch_samples=24)
    loader = build_train_loader(cfg, 0, 1, tok)
    with caplog.at_level(logging.DEBUG, logger="pipeline.data"):
        list(loader)
    assert loader.counters().get("truncated_tar") == 1, loader.counters()
    assert "skipped (truncated_tar) again" in caplog.text  # resampling drew it more than once


# ---- shard patterns ----

def test_missing_shards_are_named(tmp_path):
    write_shards(tmp_path / "p", 1, 3, index=None)
    with pytest.raises(DataError, match=r"3 of 4 shards of source 'x' do not exist: .*00001\.tar, .*00002\.tar, "
                                        r".*00003\.tar$"):
        resolve_source("x", "image", 1.0, str(tmp_path / "p" / "{00000..00003}.tar"), num_samples=12)
    with pytest.raises(DataError, match=r"2 of 2 shards of source 'y' do not exist"):
        resolve_source("y", "image", 1.0, str(tmp_path / "nowhere" / "{00000..00001}.tar"))
    with pytest.raises(DataError, match=r"1 of 2 shards of eval set .* do not exist: .*00001\.tar"):
        build_eval_samples(str(tmp_path / "p" / "{00000..00001}.tar"), "image", tiny_config([]))


def test_glob_patterns_are_expanded_sorted(tmp_path, tok):
    write_shards(tmp_path / "g", 3, 2)
    names = [str(tmp_path / "g" / f"{i:05d}.tar") for i in range(3)]
    assert resolve_source("g", "image", 1.0, str(tmp_path / "g" / "*.tar")).urls == names
    assert resolve_source("g", "image", 1.0, str(tmp_path / "g" / "0000[12].tar")).urls == names[1:]
    assert resolve_source("g", "image", 1.0, str(tmp_path / "g" / "0000?.tar")).urls == names
    with pytest.raises(DataError, match=r"shard pattern '.*nothing/\*\.tar' matches no file"):
        resolve_source("g", "image", 1.0, str(tmp_path / "nothing" / "*.tar"))
    cfg = tiny_config([dict(name="g", shards=str(tmp_path / "g" / "*.tar"))], workers=0, batch_size=2)
    assert len(list(build_train_loader(cfg, 0, 1, tok))) == 3
    assert len(list(build_eval_samples(str(tmp_path / "g" / "0000?.tar"), "image", tiny_config([])))) == 6


# ---- 16-bit PNG ----

def test_16_bit_grey_png_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 96), (96, 1)).round().astype(np.uint16)  # dark left, bright right
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode in ("I;16", "I")  # really 16-bit
    eight = io.BytesIO()
    Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").save(eight, format="PNG")
    write(tmp_path / "00000.tar", [good("g16", 0, "png", buf.getvalue()), good("g8", 0, "png", eight.getvalue())])
    (k16, p16, _), (k8, p8, _) = build_eval_samples(str(tmp_path / "00000.tar"), "image", tiny_config([]))
    row = (p16[0, :, p16.shape[-2] // 2] * CLIP_STD[:, 0] + CLIP_MEAN[:, 0]).numpy() * 255  # [3, W]
    assert row.min() < 10 and row.max() > 245 and (np.diff(row, axis=1) >= -1).all()  # a ramp, not white
    assert np.abs(p16 - p8).max() * CLIP_STD.max() * 255 < 2  # as the same image in 8 bits
