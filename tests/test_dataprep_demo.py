"""build_demo_corpus: the embedded default through every real stage, as the demo calls it."""

import json
from pathlib import Path

import pytest
import webdataset as wds

from dataprep.demo_corpus import build_demo_corpus

# One img2dataset process: two shards need no second one, and each costs an interpreter start.
SIZES = dict(n_images=24, n_videos=8, n_eval_images=8, n_eval_videos=4, train_shards=2, processes=1)


@pytest.mark.slow
def test_demo_corpus_is_built_validated_and_reused(tmp_path):
    paths = build_demo_corpus(tmp_path, seed=1, **SIZES)
    expected = {"images_train": 24, "images_eval": 8, "videos_train": 8, "videos_eval": 4}
    for name, n in expected.items():
        folder = Path(paths[name])
        sizes = json.loads((folder / "sizes.json").read_text())
        assert sum(sizes.values()) == n, name
        assert paths["reports"][name]["ok"] and paths["reports"][name]["failed_by_reason"] == {}
    assert len(json.loads((Path(paths["images_train"]) / "sizes.json").read_text())) == 2
    vocab = set(paths["vocabulary"])
    images = wds.WebDataset(sorted(str(p) for p in Path(paths["images_eval"]).glob("*.tar")), shardshuffle=False)
    captions = [txt for img, txt in images.decode("pil").to_tuple("jpg", "txt")]
    assert len(set(captions)) == 8 and all(set(c.split()) <= vocab for c in captions)
    videos = wds.WebDataset(sorted(str(p) for p in Path(paths["videos_train"]).glob("*.tar")), shardshuffle=False)
    metas = [json.loads(m) for (m,) in videos.to_tuple("json")]
    assert [m["num_frames"] for m in metas] == [16] * 8 and all(" moving " in m["caption"] for m in metas)

    # A second call finds everything done and rewrites nothing.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "synthetic" not in p.parts}
    again = build_demo_corpus(tmp_path, seed=1, **SIZES)
    assert {k: v for k, v in again.items() if k != "reports"} == {k: v for k, v in paths.items() if k != "reports"}
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert all(p.parent.name == "_prep" for p in changed), changed  # only the re-read annotation tables
