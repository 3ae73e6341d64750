"""Trust and data safety drills (in process): every valid sample is read, index values are checked,
shell pipes, decompression bombs and unsafe URLs are refused unless allowed."""
import json
from collections import Counter

import pytest

from data_fixtures import caption, tiny_config
from pipeline.data import DataError, build_train_loader
from pipeline.data.shards import resolve_source


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


# ---------------------------------------------------------------- annotation URLs
@pytest.mark.parametrize("url,problem", [
    ("file:///etc/passwd", "file_url"), ("FILE:///tmp/x.png", "file_url"), ("ftp://example.org/a.jpg", "unsupported_scheme"),
    ("http://127.0.0.1:8000/a.jpg", "loopback_address"), ("http://localhost/a.jpg", "loopback_address"),
    ("http://[::1]/a.jpg", "loopback_address"), ("http://[::ffff:127.0.0.1]/a.jpg", "loopback_address"),
    ("http://2130706433/a.jpg", "loopback_address"),  # 127.0.0.1 written as one number: resolved, then judged
    ("http://169.254.169.254/latest/meta-data/", "link_local_address"), ("http://10.1.2.3/a.jpg", "private_address"),
    ("http://192.168.0.7/a.jpg", "private_address"), ("http://0.0.0.0/a.jpg", "reserved_address"),
    ("https://93.184.216.34/a.jpg", None), ("http://images.example.org/a.jpg", None),  # public / unresolvable here
])
def test_urls_that_reach_local_files_or_internal_addresses_are_named(url, problem):
    from dataprep.urls import url_problem

    assert url_problem(url) == problem


def test_a_redirect_inwards_is_refused():
    import urllib.error

    from dataprep.fetch import _CheckedRedirects

    with pytest.raises(urllib.error.URLError, match="refused: link_local_address"):
        _CheckedRedirects().redirect_request(None, None, 302, "Found", {}, "http://169.254.169.254/latest/meta-data/")


@pytest.mark.slow
def test_annotation_rows_of_local_files_and_loopback_servers_are_refused_unless_allowed(tmp_path):
    """A CC3M list whose rows name a local file (file://) and a server on 127.0.0.1, through the real
    stages (img2dataset downloads): refused and counted by default; fetched once the corpus allows it."""
    import io

    from PIL import Image

    from dataprep import stages
    from dataprep.config import CorpusConfig
    from dataprep.serve import LoopbackServer

    www = tmp_path / "www"
    www.mkdir()
    for name, colour in (("inside.jpg", (200, 0, 0)), ("secret.png", (0, 0, 200))):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), colour).save(buf, "PNG" if name.endswith(".png") else "JPEG")
        (www / name).write_bytes(buf.getvalue())
    with LoopbackServer(www) as srv:
        (tmp_path / "list.tsv").write_text(f"a red picture\t{srv.url}/inside.jpg\n"
                                           f"a blue secret\tfile://{www / 'secret.png'}\n")
        for allow in (False, True):
            cfg = CorpusConfig(name="web", format="cc3m", input=str(tmp_path / "list.tsv"), image_size=32,
                               output_dir=str(tmp_path / f"shards_{allow}"), shard_size=4, threads=2, retries=0,
                               timeout=5, allow_private_urls=allow)
            table = stages.annotations(cfg)
            stages.download(cfg)
            report = stages.validate_stage(cfg)
            if not allow:
                assert table["rejected"] == {"refused: file_url": 1, "refused: loopback_address": 1}
                assert table["rows_kept"] == 0 and report["samples"]["valid"] == 0
            else:
                assert table["rows_kept"] == 2 and report["samples"]["valid"] == 2


# ---------------------------------------------------------------- failed downloads
@pytest.mark.slow
def test_retriable_failures_are_retried_by_the_next_download_and_keep_validate_failing(tmp_path, capsys):
    """40 images in 4 shards through img2dataset; the server answers 503 for 10 of them (in shards 0
    and 2). validate fails and names the shards' success rates until a second download, once the
    server is back, fetched them; a 404 is final and only min_success judges it."""
    import io

    from PIL import Image

    from dataprep import stages
    from dataprep.config import CorpusConfig
    from dataprep.serve import Faults, LoopbackServer

    www = tmp_path / "www"
    www.mkdir()
    for i in range(40):
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), (6 * i, 90, 30)).save(buf, "JPEG")
        (www / f"{i}.jpg").write_bytes(buf.getvalue())
    faults = Faults(status={f"/{i}.jpg": 503 for i in (*range(0, 5), *range(20, 25))})
    with LoopbackServer(www, faults) as srv:
        (tmp_path / "list.tsv").write_text("".join(f"picture number {i}\t{srv.url}/{i}.jpg\n" for i in range(40)))
        cfg = CorpusConfig(name="web", format="cc3m", input=str(tmp_path / "list.tsv"), image_size=32, shard_size=10,
                           output_dir=str(tmp_path / "shards"), threads=4, retries=0, timeout=5,
                           allow_private_urls=True)
        stages.annotations(cfg)
        assert stages.download(cfg)["succeeded"] == 30
        report = stages.validate_stage(cfg)
        assert not report["ok"] and report["retriable_failures"] == 10
        assert report["shards"]["success_rate"] == {"00000.tar": 0.5, "00001.tar": 1.0, "00002.tar": 0.5,
                                                    "00003.tar": 1.0}
        out = capsys.readouterr().out
        assert "00000.tar: 50.0% of its rows downloaded" in out and "worth retrying" in out
        faults.status.clear()  # the server is back
        faults.status["/7.jpg"] = 404  # ... but one image of a retried shard is gone for good
        summary = stages.download(cfg)
        assert "retrying 2 shard(s)" in capsys.readouterr().out
    assert summary["succeeded"] == 39
    report = stages.validate_stage(cfg)  # a 404 is no reason to retry: ok
    assert report["ok"] and report["samples"]["valid"] == 39 and report["retriable_failures"] == 0
    assert report["shards"]["success_rate"]["00000.tar"] == 0.9
    strict = stages.validate_stage(CorpusConfig(**{**cfg.__dict__, "min_success": 0.95}))
    assert not strict["ok"] and "1 shard(s) below min_success=0.95: 00000.tar 90.0%" in strict["errors"][0]


# ---------------------------------------------------------------- shell pipes in shard URLs
def test_a_pipe_url_runs_only_when_the_config_allows_it(tmp_path, tok):
    from data_fixtures import write_shards

    from pipeline.config import ConfigError, load_config

    keys = write_shards(tmp_path / "d", 1, 8)
    marker = tmp_path / "ran"
    evil = f"pipe:touch {marker}; cat {tmp_path / 'd' / '00000.tar'}"
    for key in ("data.sources", "eval.data"):
        value = f"[{{name: x, shards: '{evil}', num_samples: 8}}]" if key == "data.sources" else evil
        with pytest.raises(ConfigError, match=rf"{key}.* runs a shell command \(pipe:\): set data.allow_pipe"):
            load_config("tiny", [f"{key}={value}"])
    assert not marker.exists()
    cfg = tiny_config([dict(name="x", shards=f"pipe:cat {tmp_path / 'd' / '00000.tar'}", num_samples=8)],
                      allow_pipe=True, batch_size=4, sharding="split", workers=0)
    got = [k for batch in build_train_loader(cfg, 0, 1, tok) for k in batch["keys"]]
    assert sorted(got) == sorted(keys)  # allowed: the command ran and fed the loader


# ---------------------------------------------------------------- decompression bombs
def test_an_image_announcing_too_many_pixels_is_skipped_before_decoding(tmp_path, tok):
    """A 12000 x 12000 PNG of a few hundred KiB: skipped and counted from its header, without the
    ~430 MB decode; the limit is data.max_image_pixels."""
    import io
    import resource
    import time

    from PIL import Image
    from webdataset import TarWriter

    from data_fixtures import image_bytes

    buf = io.BytesIO()
    Image.new("L", (12000, 12000), 0).save(buf, "PNG")
    bomb = buf.getvalue()
    assert len(bomb) < 512 * 1024
    (tmp_path / "d").mkdir()
    with TarWriter(str(tmp_path / "d" / "00000.tar")) as sink:
        sink.write({"__key__": "bomb", "png": bomb, "txt": "a black square"})
        for i in range(7):
            sink.write({"__key__": f"ok{i}", "jpg": image_bytes(20 * i), "txt": caption(i)})
    (tmp_path / "d" / "sizes.json").write_text(json.dumps({"00000.tar": 7}))  # as dataprep validate indexes it
    (tmp_path / "d" / "invalid.json").write_text(json.dumps({"00000.tar": [0]}))
    cfg = tiny_config([dict(name="d", shards=str(tmp_path / "d" / "00000.tar"))], batch_size=7, sharding="split",
                      workers=0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    loader = build_train_loader(cfg, 0, 1, tok)
    keys = [k for batch in loader for k in batch["keys"]]
    assert time.perf_counter() - t < 20 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024
    assert sorted(keys) == [f"ok{i}" for i in range(7)] and loader.counters() == {"image_too_large": 1}


# ---------------------------------------------------------------- smaller
def test_a_yaml_syntax_error_names_the_file_and_steps_must_be_positive(tmp_path):
    from pipeline.config import ConfigError, load_config

    bad = tmp_path / "run.yaml"
    bad.write_text("inherit: tiny\ntrain: {steps: 5\n")
    with pytest.raises(ConfigError, match=rf"{bad}: not valid YAML") as err:
        load_config(bad)
    assert "<unicode string>" not in str(err.value)
    for steps in (0, -3):
        with pytest.raises(ConfigError, match=f"train.steps={steps}"):
            load_config("tiny", [f"train.steps={steps}"])


def test_a_zero_byte_tar_is_counted_as_empty(tmp_path, tok):
    from data_fixtures import write_shards

    write_shards(tmp_path / "d", 2, 4)
    (tmp_path / "d" / "00001.tar").write_bytes(b"")
    cfg = tiny_config([dict(name="d", shards=str(tmp_path / "d" / "{00000..00001}.tar"))], batch_size=4,
                      sharding="split", workers=0)
    loader = build_train_loader(cfg, 0, 1, tok)
    list(loader)
    assert loader.counters().get("empty_shard") == 1 and "truncated_tar" not in loader.counters()
