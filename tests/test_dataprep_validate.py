"""Validation and indexing: sizes.json, report.json, truncated / empty / unfinished shards."""

import io
import json
import os
import tarfile

import pytest

from data_fixtures import image_bytes
from dataprep.__main__ import main
from dataprep.shards import ShardWriter, sample_key
from dataprep.validate import validate


RED = (200, 10, 10)


def _shard(out, shard_id, n, bad=(), caption="a red square"):
    """A shard of n samples; indices in `bad` carry a corrupt jpg."""
    writer = ShardWriter(str(out), shard_id)
    for i in range(n):
        key = sample_key(i, shard_id, 10)
        data = b"\xff\xd8 not really a jpeg" if i in bad else image_bytes(RED, (16, 16))
        writer.write(key, caption, {"key": key, "caption": caption}, {"jpg": data})
    writer.close({"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                  "duration": 1.0, "start_time": 10.0, "end_time": 11.0, "status_dict": {"success": n}})


def test_good_shards_are_indexed_and_a_rerun_changes_nothing(tmp_path):
    for i in range(3):
        _shard(tmp_path, i, 4)
    report = validate(str(tmp_path))
    assert report["ok"] and report["errors"] == [] and report["warnings"] == []
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 4}
    assert report["samples"]["valid"] == report["succeeded"] == report["attempted"] == 12
    stamps = {n: (tmp_path / n).stat().st_mtime_ns for n in ("sizes.json", "report.json")}
    contents = {n: (tmp_path / n).read_bytes() for n in stamps}
    assert validate(str(tmp_path)) == report
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in stamps} == stamps
    assert {n: (tmp_path / n).read_bytes() for n in stamps} == contents


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_is_flagged_and_left_out_of_sizes(tmp_path, cut):
    _shard(tmp_path, 0, 4)
    _shard(tmp_path, 1, 4)
    tar = tmp_path / "00001.tar"
    data = tar.read_bytes()
    if cut == "mid_member":
        size = len(data) // 2 + 100
    else:  # right after a whole member: tarfile itself reads this without an error
        with tarfile.open(tar) as t:
            members = t.getmembers()
        size = members[5].offset_data + ((members[5].size + 511) // 512) * 512
    tar.write_bytes(data[:size])
    report = validate(str(tmp_path))
    assert not report["ok"]
    assert any(e.startswith("00001.tar: truncated") for e in report["errors"])
    assert "truncated" in report["shards"]["flagged"]["00001.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 4}
    assert main(["validate", "--output-dir", str(tmp_path)]) == 1


def test_undecodable_and_empty_shards_and_leftovers(tmp_path):
    _shard(tmp_path, 0, 4, bad={1, 2})
    _shard(tmp_path, 1, 0)
    (tmp_path / "00002.tar.tmp").write_bytes(b"partial")
    report = validate(str(tmp_path))
    assert report["samples"]["invalid"] == {"undecodable image": 2}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2}
    flagged = report["shards"]["flagged"]
    assert flagged["00000.tar"] == ["count mismatch: stats say 4 successes, 2 samples decode"]
    assert flagged["00001.tar"] == ["empty"]
    assert any("00002.tar.tmp" in e for e in report["errors"]) and not report["ok"]


def test_unfinished_download_is_an_error_not_a_short_corpus(tmp_path):
    _shard(tmp_path, 0, 4)
    _shard(tmp_path, 1, 4)
    os.remove(tmp_path / "00001_stats.json")  # the shard an interrupted run was writing
    (tmp_path / "_prep").mkdir()
    (tmp_path / "_prep" / "annotations.json").write_text(json.dumps({"rows_kept": 10, "rows_read": 10}))
    report = validate(str(tmp_path))
    assert not report["ok"]
    assert any("00001.tar: incomplete" in e for e in report["errors"])
    assert any("only 4 of 10 annotation rows" in e for e in report["errors"])
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 4}


def test_missing_caption_and_duplicate_keys_are_counted(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("a.jpg", image_bytes(RED, (16, 16))), add("a.json", b"{}")
        add("b.jpg", image_bytes(RED, (16, 16))), add("b.txt", b"   "), add("b.json", b"{}")
        add("c.jpg", image_bytes(RED, (16, 16))), add("c.txt", b"ok"), add("c.json", b"{}")
        add("d.jpg", image_bytes(RED, (16, 16))), add("d.txt", b"ok"), add("d.json", b"{}")
        add("c.jpg", image_bytes(RED, (16, 16))), add("c.txt", b"again"), add("c.json", b"{}")
    (tmp_path / "00000_stats.json").write_text(json.dumps(
        {"count": 4, "successes": 4, "failed_to_download": 0, "failed_to_resize": 0, "duration": 1,
         "start_time": 0, "end_time": 1, "status_dict": {"success": 4}}))
    report = validate(str(tmp_path))
    assert report["samples"] == {"valid": 2, "decoded": True,
                                 "invalid": {"missing caption": 1, "empty caption": 1, "duplicate key": 1}}
