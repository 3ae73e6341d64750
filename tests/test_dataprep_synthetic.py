"""The embedded default corpus and the loopback server it is served from."""

import csv
import io
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
from PIL import Image

from dataprep import shapes
from dataprep.fetch import fetch
from dataprep.serve import Faults, LoopbackServer

SMALL = dict(n_images=60, n_videos=6, n_eval_images=30, n_eval_videos=12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, shapes.generate(root, seed=3, **SMALL)


def _captions(tsv):
    return [line.split("\t")[0] for line in open(tsv, encoding="utf-8").read().splitlines()]


def _mask(img: np.ndarray, colour: str) -> np.ndarray:
    target = np.array(shapes.COLOURS[colour], dtype=int)
    return np.abs(img.astype(int) - target).sum(axis=-1) < 90


def test_lists_are_in_the_real_formats_and_point_at_the_base_url(corpus):
    root, paths = corpus
    lines = open(paths["images_train"], encoding="utf-8").read().splitlines()
    assert len(lines) == 60
    caption, url = lines[0].split("\t")
    assert url.startswith("http://127.0.0.1:8000/images/") and (root / url.split("8000/")[1]).exists()
    with open(paths["videos_eval"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]
    assert len(rows) == 12 and rows[0]["duration"] == "PT00H00M02S"


def test_captions_use_the_small_vocabulary_and_eval_captions_are_distinct(corpus):
    _, paths = corpus
    vocab = set(shapes.vocabulary())
    captions = _captions(paths["images_train"]) + _captions(paths["images_eval"])
    with open(paths["videos_train"], newline="") as f:
        captions += [r["name"] for r in csv.DictReader(f)]
    assert all(set(c.split()) <= vocab for c in captions)
    assert len(vocab) < 30
    eval_caps = _captions(paths["images_eval"])
    assert len(set(eval_caps)) == len(eval_caps) == 30


def test_images_show_what_their_captions_say(corpus):
    root, paths = corpus
    checked = 0
    for line in open(paths["images_train"], encoding="utf-8").read().splitlines():
        caption, url = line.split("\t")
        img = np.asarray(Image.open(root / url.split("8000/")[1]).convert("RGB"))
        words = caption.split()
        size = img.shape[0]
        if "on the left" in caption or "on the right" in caption:
            ys, xs = np.nonzero(_mask(img, words[1]))
            assert (xs.mean() < size / 2) == ("left" in caption), caption
            checked += 1
        elif " above " in caption and words[1] != words[5]:
            top, bottom = np.nonzero(_mask(img, words[1]))[0], np.nonzero(_mask(img, words[5]))[0]
            assert top.mean() < bottom.mean(), caption
            checked += 1
    assert checked >= 10


def test_videos_move_the_way_their_captions_say(corpus):
    root, paths = corpus
    with open(paths["videos_train"], newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        colour, motion = row["name"].split()[1], row["name"].split()[-1]
        with av.open(str(root / "videos" / f"{row['videoid']}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
        first, last = (np.argwhere(_mask(frames[i], colour)).mean(axis=0) for i in (0, -1))
        dy, dx = last - first
        expected = {"left": dx < -10, "right": dx > 10, "up": dy < -10, "down": dy > 10}[motion]
        assert expected, (row["name"], dx, dy)


def test_deterministic_from_the_seed_and_cached(tmp_path, corpus):
    root, paths = corpus
    again = shapes.generate(tmp_path / "a", seed=3, **SMALL)
    assert _captions(again["images_train"]) == _captions(paths["images_train"])
    for name in ("images/train_000007.jpg", "videos/1000002.mp4"):
        assert (tmp_path / "a" / name).read_bytes() == (root / name).read_bytes()
    other = shapes.generate(tmp_path / "b", seed=4, **SMALL)
    assert _captions(other["images_train"]) != _captions(paths["images_train"])
    # Same parameters: nothing re-rendered, only the lists rewritten for the new address.
    before = (tmp_path / "a" / "images/train_000000.jpg").stat().st_mtime_ns
    moved = shapes.generate(tmp_path / "a", seed=3, base_url="http://127.0.0.1:9/", **SMALL)
    assert (tmp_path / "a" / "images/train_000000.jpg").stat().st_mtime_ns == before
    assert open(moved["images_train"]).readline().split("\t")[1].startswith("http://127.0.0.1:9/images/")


def test_eval_split_cannot_ask_for_more_distinct_captions_than_exist(tmp_path):
    limit = shapes.distinct_captions()["videos"]
    with pytest.raises(ValueError, match="distinct"):
        shapes.generate(tmp_path, n_images=1, n_videos=1, n_eval_images=1, n_eval_videos=limit + 1)


def test_loopback_server_serves_files_and_injects_faults(corpus):
    root, _ = corpus
    real = (root / "images/train_000001.jpg").read_bytes()
    faults = Faults(status={"/images/train_000002.jpg": 404}, payload={"/fake.jpg": b"<html>no</html>"},
                    truncate={"/images/train_000003.jpg"})
    with LoopbackServer(root, faults) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(srv.url + "/images/train_000001.jpg").read() == real
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(srv.url + "/images/train_000002.jpg")
        assert err.value.code == 404
        assert urllib.request.urlopen(srv.url + "/fake.jpg").read() == b"<html>no</html>"
        data, error = fetch({"url": srv.url + "/images/train_000003.jpg"}, timeout=5, retries=0, allow_private=True)
        assert data is None and "truncated" in error
        data, error = fetch({"url": srv.url + "/images/train_000002.jpg"}, timeout=5, retries=3, allow_private=True)
        assert data is None and error == "HTTP Error 404: Not Found"
        data, error = fetch({"url": srv.url + "/images/train_000001.jpg"}, timeout=5, retries=0)
        assert data is None and error.startswith("refused: loopback_address")  # not allowed by default
        url = srv.url
    data, error = fetch({"url": url + "/images/train_000001.jpg"}, timeout=2, retries=0, allow_private=True)
    assert data is None and "connection refused" in error.lower()  # stopped with the context
    Image.open(io.BytesIO(real)).verify()
