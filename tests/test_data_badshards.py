"""Bad data is skipped, counted per reason and logged; a source with nothing usable is an error."""
import json
import logging

import pytest
from webdataset import TarWriter

from data_fixtures import caption, image_bytes, tiny_config, write_shards
from pipeline.data import DataError, build_eval_samples, build_train_loader


def write(path, samples):
    with TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def good(key, value=100, text=None):
    return {"__key__": key, "jpg": image_bytes(value), "txt": text if text is not None else caption(len(key))}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """An image source with a corrupt JPEG, an empty caption, a sample without image, a truncated tar
    and a sample repeated across a shard boundary; a video source with a corrupt MP4."""
    root = tmp_path_factory.mktemp("broken")
    img = root / "img"
    img.mkdir()
    a = [good(f"a{i}", 10 * i) for i in range(8)]
    a[2]["jpg"] = image_bytes(50, size=(64, 64))[:300]  # cut mid-scan
    a[5]["txt"] = "  \n"
    a[6] = {"__key__": "a6", "txt": "a caption without its image"}
    write(img / "00000.tar", a)
    write(img / "00001.tar", [good(f"b{i}", 5 * i) for i in range(8)])
    data = (img / "00001.tar").read_bytes()
    (img / "00001.tar").write_bytes(data[: len(data) * 6 // 10])  # truncated after indexing
    write(img / "00002.tar", [a[7]] + [good(f"c{i}", 7 * i) for i in range(8)])  # a7 again, first
    (img / "sizes.json").write_text(json.dumps({"00000.tar": 8, "00001.tar": 8, "00002.tar": 9}))
    vid = root / "vid"
    write_shards(vid, 2, 4, modality="video", prefix="v",
                 media=lambda s, i: b"\x00\x00\x00\x18ftypmp42" + bytes(500) if (s, i) == (1, 1) else None)
    bad_keys = {"a2", "a5", "a6", "v000100001"}
    sure_good = {f"a{i}" for i in (0, 1, 3, 4, 7)} | {f"c{i}" for i in range(8)}
    return root, bad_keys, sure_good


def sources(root):
    return [dict(name="img", shards=str(root / "img" / "{00000..00002}.tar")),
            dict(name="vid", shards=str(root / "vid"), modality="video")]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(broken, tok, workers, caplog):
    root, bad_keys, sure_good = broken
    cfg = tiny_config(sources(root), sharding="split", workers=workers, batch_size=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, 0, 1, tok)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == loader.steps_per_epoch == (25 + 8) // 2
    assert not set(keys) & bad_keys and sure_good <= set(keys)
    counts = loader.counters()
    for reason in ("corrupt_image", "empty_caption", "missing_media", "truncated_tar", "corrupt_video"):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    assert sum(sum(b["skipped"].values()) for b in batches) == sum(counts.values())
    if workers == 0:  # one reader sees both shards around the repeated key
        assert counts.get("duplicate_key", 0) >= 1 and keys.count("a7") <= 2
        assert "skipped (corrupt_image)" in caplog.text and "00001.tar" in caplog.text


def test_truncated_shard_yields_its_intact_samples(broken, tok):
    root, _, _ = broken
    cfg = tiny_config([dict(name="t", shards=str(root / "img" / "00001.tar"), num_samples=8)],
                      workers=0, batch_size=1, sharding="split")
    keys = [b["keys"][0] for b in build_train_loader(cfg, 0, 1, tok)]
    intact = {k for k in keys}
    assert intact and intact < {f"b{i}" for i in range(8)}  # some samples, not all


@pytest.mark.parametrize("workers,sharding", [(0, "split"), (1, "resample")])
def test_source_with_nothing_usable_is_an_error(tmp_path, tok, workers, sharding):
    write_shards(tmp_path / "junk", 2, 3, media=lambda s, i: b"garbage")
    cfg = tiny_config([dict(name="junk", shards=str(tmp_path / "junk"))], workers=workers, batch_size=2,
                      sharding=sharding)
    with pytest.raises(DataError, match="no usable sample"):
        list(build_train_loader(cfg, 0, 1, tok))
    # shards that are not tars at all, and one that is missing: nothing is ever read from them
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "junk" / name).write_bytes(b"\x00" * 700)
    (tmp_path / "junk" / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 3, "00002.tar": 3}))
    cfg.data.sources[0].shards = str(tmp_path / "junk" / "{00000..00002}.tar")
    cfg.data.workers = 0  # (a DataLoader that raised takes torch ~5 s to shut its workers down)
    loader = build_train_loader(cfg, 0, 1, tok)
    with pytest.raises(DataError, match="no usable sample"):
        list(loader)


def test_eval_samples_order_captions_and_skips(broken, tmp_path):
    root, bad_keys, _ = broken
    cfg = tiny_config([])
    samples = build_eval_samples(str(root / "img" / "00000.tar"), "image", cfg)
    first = list(samples)
    assert [k for k, _, _ in first] == ["a0", "a1", "a3", "a4", "a7"]
    assert samples.skipped == {"corrupt_image": 1, "empty_caption": 1, "missing_media": 1}
    again = list(samples)
    assert all(k1 == k2 and (p1 == p2).all() for (k1, p1, _), (k2, p2, _) in zip(first, again))
    assert first[0][1].shape == (1, 3, cfg.data.image_size, cfg.data.image_size)
    # captions: the json's list when present, else the txt's lines
    write(tmp_path / "e.tar", [
        {"__key__": "x", "jpg": image_bytes(1), "txt": "ignored",
         "json": json.dumps({"captions": ["one", "two", ""]}).encode()},
        {"__key__": "y", "jpg": image_bytes(2), "txt": "first line\nsecond line\n"}])
    got = {k: c for k, _, c in build_eval_samples(str(tmp_path / "e.tar"), "image", cfg)}
    assert got == {"x": ["one", "two"], "y": ["first line", "second line"]}
    assert [k for k, _, _ in build_eval_samples(str(tmp_path / "e.tar"), "image", cfg, num_samples=1)] == ["x"]
    videos = list(build_eval_samples(str(root / "vid" / "{00000..00001}.tar"), "video", cfg))
    assert len(videos) == 7 and all(p.shape == (cfg.data.num_frames, 3, 32, 32) for _, p, _ in videos)
