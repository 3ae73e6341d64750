"""The video stage: real clips over loopback HTTP, bad input counted by reason, interrupt + resume."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import webdataset as wds
import yaml
from PIL import Image

from dataprep import stages, shapes
from dataprep.config import CorpusConfig
from dataprep.readers import parse_iso_duration
from dataprep.serve import Faults, LoopbackServer
from dataprep.validate import _tail_is_intact
from dataprep.videos import VideoError, VideoOptions, segment_middles, transcode
from pipeline.config import load_config
from pipeline.data import build_eval_samples

REPO = Path(__file__).resolve().parents[1]
WEBVID = REPO.parent / "shared" / "data" / "webvid_9"


def _make_clips(folder: Path, lengths: dict[str, int]) -> None:
    """Synthetic stand-ins for real clips: `lengths` maps a video id to its number of frames (8 fps)."""
    folder.mkdir(parents=True, exist_ok=True)
    import random

    for i, (videoid, frames) in enumerate(lengths.items()):
        spec = {"colour": "red", "shape": "square", "motion": "left"}
        shapes.encode_mp4(shapes.render_video_frames(spec, 64, frames, random.Random(i)), 8,
                             folder / f"{videoid}.mp4")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder of mp4s, WebVid rows with durations): the real WebVid clips, or generated ones."""
    csv_path = REPO.parent / "shared" / "data" / "annotations" / "webvid_results_2M_val_sample.csv"
    if (WEBVID / "videos").is_dir() and csv_path.exists():
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return WEBVID / "videos", rows
    folder = tmp_path_factory.mktemp("clips")
    lengths = {str(1000 + i): (48 if i < 2 else 16) for i in range(8)}
    _make_clips(folder, lengths)
    rows = [{"videoid": v, "name": f"clip number {v}", "page_idx": "1", "page_dir": "d",
             "duration": f"PT00H00M{n // 8:02d}S"} for v, n in lengths.items()]
    return folder, rows


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    """One run of annotations -> download -> validate over a server with faults."""
    folder, rows = source
    tmp = tmp_path_factory.mktemp("webvid")
    seconds = {r["videoid"]: parse_iso_duration(r["duration"]) for r in rows}
    by_length = sorted(seconds, key=seconds.get, reverse=True)
    too_long, rest = by_length[:2], by_length[2:]
    threshold = (seconds[by_length[1]] + seconds[by_length[2]]) / 2
    missing, html, cut, good = rest[0], rest[1], rest[2], rest[3:]
    faults = Faults(status={f"/{missing}.mp4": 404}, payload={f"/{html}.mp4": b"<html>moved</html>"},
                    truncate={f"/{cut}.mp4"})
    with LoopbackServer(folder, faults) as srv:
        table = tmp / "results_2M_val.csv"
        with open(table, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
            for r in rows:
                w.writerow([r["videoid"], r["name"], r["page_idx"], r["page_dir"], r["duration"],
                            f"{srv.url}/{r['videoid']}.mp4"])
            w.writerow(["1", "   ", "1", "d", "PT00H00M01S", f"{srv.url}/1.mp4"])  # empty caption
            w.writerow(["2", "no link", "1", "d", "PT00H00M01S", "not a link"])
            w.writerow(["3", "nobody listens there", "1", "d", "PT00H00M01S", "http://127.0.0.1:9/3.mp4"])
        cfg = CorpusConfig(name="webvid", modality="video", format="webvid", input=str(table), allow_private_urls=True,
                           retry_rounds=0,  # the injected faults are final here
                           output_dir=str(tmp / "shards"), shard_size=3, threads=3, retries=1, timeout=10,
                           video_size=64, fps=4, max_duration=2, max_source_duration=threshold)
        stages.annotations(cfg)
        summary = stages.download(cfg)
        report = stages.validate_stage(cfg)
    captions = {r["videoid"]: " ".join(r["name"].split()) for r in rows}
    return {"cfg": cfg, "out": tmp / "shards", "summary": summary, "report": report, "good": good,
            "captions": captions, "too_long": too_long}


def _samples(out: Path) -> list[dict]:
    """Read back with a plain webdataset pipeline, as any consumer of the shards would."""
    ds = wds.WebDataset([str(t) for t in sorted(out.glob("*.tar"))], shardshuffle=False)
    return [{"mp4": m, "txt": t.decode(), "json": json.loads(j)} for m, t, j in ds.to_tuple("mp4", "txt", "json")]


def test_shards_hold_exactly_the_good_clips_with_their_captions(prepared):
    samples = _samples(prepared["out"])
    assert sorted(s["json"]["source_key"] for s in samples) == sorted(prepared["good"])
    for s in samples:
        assert s["txt"] == prepared["captions"][s["json"]["source_key"]]
        assert s["json"]["caption"] == s["txt"] and s["json"]["url"].endswith(f"/{s['json']['source_key']}.mp4")


def test_every_stored_clip_decodes_to_the_limits_asked_for(prepared):
    for s in _samples(prepared["out"]):
        meta = s["json"]
        with av.open(io.BytesIO(s["mp4"])) as c:
            frames = [f for f in c.decode(c.streams.video[0])]
        assert len(frames) == meta["num_frames"] > 0
        assert (frames[0].width, frames[0].height) == (meta["width"], meta["height"])
        assert min(meta["width"], meta["height"]) <= 64 and meta["fps"] <= 4
        assert meta["duration"] <= 2.0 + 1e-6
        assert meta["trimmed"] == (meta["original_duration"] > 2.0)


def test_stored_frames_are_the_clips_middle_frames_and_the_loader_reads_them(prepared):
    ds = wds.WebDataset([str(t) for t in sorted(prepared["out"].glob("*.tar"))], shardshuffle=False)
    n = 0
    for sample in ds:
        meta = json.loads(sample["json"])
        with av.open(io.BytesIO(sample["mp4"])) as c:
            clip = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        wanted = segment_middles(meta["num_frames"], 8)
        assert meta["frame_indices"] == wanted and meta["keyframe_interval"] == 4
        assert sorted(k for k in sample if k.startswith("frame")) == [f"frame{i:02d}.jpg" for i in range(len(wanted))]
        for i, t in enumerate(wanted):
            jpg = np.asarray(Image.open(io.BytesIO(sample[f"frame{i:02d}.jpg"])).convert("RGB"), dtype=np.float32)
            assert np.abs(jpg - clip[t]).mean() < 4  # JPEG quality 90
        n += 1
    assert n == len(prepared["good"])
    cfg = load_config("tiny", ["data.video_size=32"])
    samples = build_eval_samples(str(prepared["out"]), "video", cfg)
    assert sum(1 for _, pixels, _ in samples if pixels.shape == (4, 3, 32, 32)) == n and samples.skipped == {}


def test_failures_are_counted_by_reason(prepared):
    report = prepared["report"]
    assert report["failed_by_reason"] == {"connection_error": 1, "http_404": 1, "not_a_video": 1,
                                          "truncated_download": 1, "video_too_long": 2}
    assert report["annotations"]["rejected"] == {"empty caption": 1, "invalid url": 1}
    n_rows = report["annotations"]["rows_kept"]
    assert report["attempted"] == n_rows == len(prepared["good"]) + 6
    assert report["succeeded"] == report["samples"]["valid"] == len(prepared["good"])
    assert report["ok"] and report["video_seconds"] > 0
    sizes = json.loads((prepared["out"] / "sizes.json").read_text())
    assert sum(sizes.values()) == len(prepared["good"])
    statuses = pd.concat(pd.read_parquet(p) for p in sorted(prepared["out"].glob("0*.parquet")))
    assert len(statuses) == n_rows
    assert set(statuses.loc[statuses.status != "success", "source_key"]) >= set(prepared["too_long"])


def test_rerun_on_a_finished_corpus_redoes_nothing(prepared):
    out = prepared["out"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    stages.download(prepared["cfg"])
    stages.validate_stage(prepared["cfg"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps


def test_transcode_rejects_what_is_not_a_video(tmp_path):
    _make_clips(tmp_path, {"a": 16})
    clip = (tmp_path / "a.mp4").read_bytes()
    with pytest.raises(VideoError, match="not a video"):
        transcode(b"<html>404</html>", VideoOptions())
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "JPEG")
    with pytest.raises(VideoError, match="no video stream"):
        transcode(buf.getvalue(), VideoOptions())
    with pytest.raises(VideoError):
        transcode(clip[: len(clip) // 3], VideoOptions())
    streams, meta = transcode(clip, VideoOptions(video_size=32, resize_mode="center_crop", fps=None, max_duration=1))
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (32, 32, 8, 8.0)
    assert sorted(streams) == [f"frame{i:02d}.jpg" for i in range(8)] + ["mp4"]  # 8 frames: all of them
    assert meta["frame_indices"] == list(range(8))
    streams, meta = transcode(clip, VideoOptions(video_size=32, fps=None, max_duration=1, frames=0))
    assert list(streams) == ["mp4"] and "frame_indices" not in meta
    with pytest.raises(ValueError, match="frames"):
        VideoOptions(frames=100)
    with pytest.raises(ValueError, match="keyframe_interval"):
        VideoOptions(keyframe_interval=0)


@pytest.mark.slow
def test_killed_download_resumes_without_redoing_finished_shards(tmp_path):
    clips = tmp_path / "clips"
    _make_clips(clips, {str(i): 16 for i in range(12)})
    faults = Faults(delay_s=0.4)  # slow enough to be killed half-way
    with LoopbackServer(clips, faults) as srv:
        table = tmp_path / "list.csv"
        pd.DataFrame({"url": [f"{srv.url}/{i}.mp4" for i in range(12)],
                      "caption": [f"clip {i}" for i in range(12)]}).to_csv(table, index=False)
        settings = {"name": "clips", "modality": "video", "format": "generic", "input": str(table),
                    "output_dir": str(tmp_path / "shards"), "shard_size": 2, "threads": 1, "video_size": 32,
                    "allow_private_urls": True}
        config = tmp_path / "clips.yaml"
        config.write_text(yaml.safe_dump(settings))
        cfg = CorpusConfig(**settings)
        stages.annotations(cfg)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "dataprep", "download", str(config)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = tmp_path / "shards"
        deadline = time.time() + 120
        while len(list(out.glob("*_stats.json"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = sorted(p.name for p in out.glob("*_stats.json"))
        assert 2 <= len(done) < 6, done
        # No truncated tar is left: unfinished shards exist only under a temporary name.
        assert all(_tail_is_intact_path(p) for p in out.glob("*.tar"))
        assert not stages.validate_stage(cfg)["ok"]
        stamps = {n: (out / n.replace("_stats.json", ".tar")).stat().st_mtime_ns for n in done}
        faults.delay_s = 0.0
        stages.download(cfg)
    report = stages.validate_stage(cfg)
    assert report["ok"] and report["samples"]["valid"] == 12 and report["shards"]["indexed"] == 6
    assert {n: (out / n.replace("_stats.json", ".tar")).stat().st_mtime_ns for n in done} == stamps
    assert not list(out.glob("*.tmp"))


def _tail_is_intact_path(path: Path) -> bool:
    import fsspec

    fs = fsspec.filesystem("file")
    return _tail_is_intact(fs, str(path), path.stat().st_size)
