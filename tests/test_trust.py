"""Trust and data safety drills (in process): every valid sample is read, index values are checked,
shell pipes, decompression bombs and unsafe URLs are refused unless allowed."""
import json
from collections import Counter

import pytest

from data_fixtures import caption, tiny_config
from pipeline.data import DataError, build_train_loader, train_tokenizer
from pipeline.data.shards import resolve_source


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([caption(i) for i in range(200)], tmp_path_factory.mktemp("tok"), vocab_size=400)


def _dataprep_shard(out, shard_id, n, bad=()):
    """A shard as dataprep writes it (ShardWriter, _stats.json); samples at `bad` carry a corrupt jpg."""
    import io

    from PIL import Image

    from dataprep.shards import ShardWriter, sample_key

    writer = ShardWriter(str(out), shard_id)
    keys = []
    for i in range(n):
        key = sample_key(i, shard_id, 100)
        buf = io.BytesIO()
        Image.new("RGB", (20, 16), ((7 * i) % 256, 30, 90)).save(buf, "JPEG")
        data = b"\xff\xd8 not really a jpeg" if i in bad else buf.getvalue()
        writer.write(key, caption(i), {"key": key}, {"jpg": data})
        if i not in bad:
            keys.append(key)
    good = n - len(bad)
    writer.close({"count": n, "successes": good, "failed_to_download": 0, "failed_to_resize": 0, "duration": 1.0,
                  "start_time": 1.0, "end_time": 2.0, "status_dict": {"success": good}})
    return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_every_valid_sample_is_read_once_per_epoch_past_invalid_ones(tmp_path, tok, workers):
    """A shard of 43 samples with 8 invalid (some at its end) beside a clean one: dataprep's index
    counts the valid ones, and every valid sample trains once in each of 6 epochs."""
    from dataprep.validate import validate

    valid = _dataprep_shard(tmp_path, 0, 43, bad={0, 5, 6, 20, 39, 40, 41, 42}) + _dataprep_shard(tmp_path, 1, 20)
    report = validate(str(tmp_path))
    assert report["samples"]["valid"] == 55 and json.loads((tmp_path / "sizes.json").read_text())["00000.tar"] == 35
    cfg = tiny_config([dict(name="d", shards=str(tmp_path / "{00000..00001}.tar"))], sharding="split",
                      workers=workers, batch_size=5, shuffle_buffer=8)
    loader = build_train_loader(cfg, 0, 1, tok)
    assert loader.steps_per_epoch == 11
    for epoch in range(6):
        keys = Counter(k for batch in loader for k in batch["keys"])
        assert sorted(keys) == sorted(valid) and set(keys.values()) == {1}, (epoch, keys)


@pytest.mark.parametrize("value,shown", [(-500, "-500"), ("abc", "'abc'"), (2.5, "2.5"), (True, "True")])
def test_a_bad_count_in_sizes_json_names_the_file_and_the_shard(tmp_path, value, shown):
    _dataprep_shard(tmp_path, 0, 4)
    _dataprep_shard(tmp_path, 1, 4)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": value}))
    with pytest.raises(DataError, match=rf"{tmp_path}/sizes.json: shard 00001.tar has count {shown}"):
        resolve_source("d", "image", 1.0, str(tmp_path / "{00000..00001}.tar"))
