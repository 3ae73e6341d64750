"""Shards written by img2dataset itself, downloading from a loopback HTTP server, read by the loader."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_fixtures import caption, serve, tiny_config
from pipeline.data import build_eval_samples, build_train_loader, train_tokenizer



@pytest.fixture
def http_root(tmp_path):
    """A folder served on 127.0.0.1 for the test's duration; yields (folder, base url)."""
    root = tmp_path / "www"
    root.mkdir()
    with serve(root) as base:
        yield root, base


@pytest.mark.slow
def test_img2dataset_shards(http_root, tmp_path):
    import img2dataset

    root, base = http_root
    rng = np.random.default_rng(0)
    rows = []
    for i in range(11):
        w, h = 60 + 10 * i, 90 - 3 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        rows.append({"url": f"{base}/{i}.jpg", "caption": caption(i)})
    rows.append({"url": f"{base}/missing.jpg", "caption": "a picture that is not there"})  # a 404
    pd.DataFrame(rows).to_parquet(tmp_path / "list.parquet")
    out = tmp_path / "shards"
    img2dataset.download(url_list=str(tmp_path / "list.parquet"), input_format="parquet", url_col="url",
                         caption_col="caption", output_format="webdataset", output_folder=str(out),
                         image_size=48, resize_mode="center_crop", processes_count=1, thread_count=4,
                         number_sample_per_shard=5, timeout=5, retries=0, enable_wandb=False)
    meta = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))
    ok = meta[meta.status == "success"]
    assert len(ok) == 11 and sorted(p.name for p in out.glob("*_stats.json")) == [
        "00000_stats.json", "00001_stats.json", "00002_stats.json"]

    # Training: sample counts from img2dataset's own _stats.json, every sample once per epoch.
    tok = train_tokenizer([r["caption"] for r in rows], tmp_path / "tok", vocab_size=300)
    cfg = tiny_config([dict(name="web", shards=str(out / "{00000..00002}.tar"))], sharding="split",
                      workers=2, batch_size=1, image_size=32)
    loader = build_train_loader(cfg, 0, 1, tok)
    keys = [k for b in loader for k in b["keys"]]
    assert loader.steps_per_epoch == 11 and sorted(keys) == sorted(ok.key) and loader.counters() == {}

    # Evaluation: captions as written, pixels deterministic.
    samples = list(build_eval_samples(str(out / "{00000..00002}.tar"), "image", cfg))
    assert {k: c for k, _, c in samples} == {k: [c] for k, c in zip(ok.key, ok.caption)}
    assert samples[0][1].shape == (1, 3, 32, 32)
