"""Video shard formats through the real loader: the stage's stored frames and seekable clips, the
earlier clip-only shards, and a corrupt stored frame as a counted, logged skip.

Every clip is the dataprep stage's own output (dataprep.videos.transcode) of a PyAV clip whose frame t
is grey level LEVELS[t] with a white square moving across it: the level says which frame the
loader took, the square gives the JPEG comparison some texture.
"""
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from webdataset import TarWriter

from data_fixtures import caption, tiny_config
from dataprep.videos import VideoOptions, segment_middles, transcode
from pipeline.data import build_eval_samples, build_train_loader
from pipeline.data.image import CLIP_MEAN, CLIP_STD

REPO = Path(__file__).resolve().parents[1]
N_FRAMES, SIDE, K = 16, 48, 8
LEVELS = [20 + 13 * t for t in range(N_FRAMES)]  # 20 .. 215, 13 apart


def source_clip() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.qmin, stream.codec_context.qmax = 1, 3
        for t, level in enumerate(LEVELS):
            x = np.full((SIDE, SIDE, 3), level, np.uint8)
            x[30:42, 2 * t:2 * t + 12] = 255  # in the bottom quarter: the median stays the level
            out.mux(stream.encode(av.VideoFrame.from_ndarray(x, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def decode_all(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised [..., 3, H, W] back to 0..255."""
    return x.numpy() * (CLIP_STD * 255) + CLIP_MEAN * 255


def level_of(frame: torch.Tensor) -> float:
    return float(np.median(to_pixels(frame)))


def write(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """Shards of 8 samples each: `frames` (the stage's sample now: seekable clip + K frames), `clip`
    (that clip alone) and `old` (the stage's earlier output: x264's own GOP, no frames)."""
    root = tmp_path_factory.mktemp("formats")
    src = source_clip()
    new, meta = transcode(src, VideoOptions(video_size=SIDE, fps=None, frames=K))
    old, _ = transcode(src, VideoOptions(video_size=SIDE, fps=None, keyframe_interval=None, frames=0))
    media = {"frames": new, "clip": {"mp4": new["mp4"]}, "old": old}
    for name, members in media.items():
        write(root / name / "00000.tar", [{"__key__": f"{name}{i}", "txt": caption(i),
                                           "json": json.dumps(meta).encode(), **members} for i in range(8)])
        (root / name / "sizes.json").write_text(json.dumps({"00000.tar": 8}))
    return root, new, meta


def test_stage_stores_the_middle_frames_of_a_seekable_clip(formats):
    _, new, meta = formats
    assert meta["num_frames"] == N_FRAMES and meta["keyframe_interval"] == 4
    assert meta["frame_indices"] == segment_middles(N_FRAMES, K) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sorted(new) == ["frame0%d.jpg" % i for i in range(K)] + ["mp4"]
    with av.open(io.BytesIO(new["mp4"])) as c:
        stream = c.streams.video[0]
        packets = [p for p in c.demux(stream) if p.size]
        keys = [i for i, p in enumerate(packets) if p.is_keyframe] + [len(packets)]
        assert keys[0] == 0 and max(np.diff(keys)) <= 4  # (x264 may add a keyframe at a scene cut)
        assert [p.pts for p in packets] == sorted(p.pts for p in packets)  # no B-frames: decode order = display order
    clip = decode_all(new["mp4"])
    for i, t in enumerate(meta["frame_indices"]):
        jpg = np.asarray(Image.open(io.BytesIO(new[f"frame{i:02d}.jpg"])).convert("RGB"), dtype=np.float32)
        diff = np.abs(jpg - clip[t])
        assert diff.mean() < 2 and diff.max() < 60, (t, diff.mean(), diff.max())  # JPEG quality 90
        assert abs(np.median(jpg) - LEVELS[t]) <= 3


@pytest.mark.parametrize("name", ["frames", "clip", "old"])
def test_training_loader_reads_every_format(formats, tok, name):
    """[B, T, 3, H, W]; frame t comes from segment t of the clip (stored frames: of the K stored)."""
    root, _, meta = formats
    cfg = tiny_config([dict(name=name, shards=str(root / name), modality="video")], sharding="split",
                      workers=0, batch_size=4, video_size=16, crop_scale=[1.0, 1.0])  # square clip: full frame
    loader = build_train_loader(cfg, 0, 1, tok)
    chosen = set()
    for b in loader:
        assert b["pixels"].shape == (4, 4, 3, 16, 16) and b["skipped"] == {}
        for clip in b["pixels"]:
            for t, frame in enumerate(clip):
                seg = range(4 * t, 4 * t + 4)  # 16 frames in 4 segments
                allowed = [meta["frame_indices"][i] for i in (2 * t, 2 * t + 1)] if name == "frames" else seg
                level = level_of(frame)
                match = [i for i in allowed if abs(level - LEVELS[i]) <= 4]
                assert match, (name, t, level)
                chosen.add(match[0])
    assert len(chosen) > 4  # random within segments, not always the same frame
    assert loader.counters() == {}


def test_stored_frames_match_the_clip_in_evaluation(formats):
    """With T = K the frames path and the clip path choose the same frames: equal within JPEG error."""
    root, _, _ = formats
    cfg = tiny_config([], video_size=SIDE, num_frames=K)
    frames = list(build_eval_samples(str(root / "frames" / "00000.tar"), "video", cfg))
    clips = list(build_eval_samples(str(root / "clip" / "00000.tar"), "video", cfg))
    assert len(frames) == len(clips) == 8
    for (_, a, _), (_, b, _) in zip(frames, clips):
        assert a.shape == b.shape == (K, 3, SIDE, SIDE)
        diff = np.abs(to_pixels(a) - to_pixels(b))
        assert diff.mean() < 2 and diff.max() < 60, (diff.mean(), diff.max())
        assert all(abs(level_of(f) - LEVELS[t]) <= 4 for f, t in zip(a, range(1, N_FRAMES, 2)))


@pytest.fixture(scope="module")
def corrupt(formats):
    """A frames shard with one sample's frames cut mid-scan and one sample missing frame03."""
    root, new, meta = formats
    samples = [{"__key__": f"s{i}", "txt": caption(i), "json": json.dumps(meta).encode(), **new} for i in range(8)]
    samples[2] = {**samples[2], **{f"frame{i:02d}.jpg": new[f"frame{i:02d}.jpg"][:200] for i in range(K)}}
    samples[5] = {k: v for k, v in samples[5].items() if k != "frame03.jpg"}
    write(root / "corrupt" / "00000.tar", samples)
    (root / "corrupt" / "sizes.json").write_text(json.dumps({"00000.tar": 8}))
    return root / "corrupt"


def test_a_corrupt_stored_frame_is_a_counted_skip(corrupt, tok, caplog):
    cfg = tiny_config([dict(name="c", shards=str(corrupt), modality="video")], sharding="split", workers=0,
                      batch_size=2)
    loader = build_train_loader(cfg, 0, 1, tok)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        keys = [k for b in loader for k in b["keys"]]
    assert loader.counters() == {"corrupt_video": 2}
    assert "s2" not in keys and "s5" not in keys and len(keys) == 8  # refilled from a further pass
    assert "skipped (corrupt_video)" in caplog.text and "not numbered" in caplog.text
    evaluated = build_eval_samples(str(corrupt / "00000.tar"), "video", cfg)
    assert [k for k, _, _ in evaluated] == [f"s{i}" for i in (0, 1, 3, 4, 6, 7)]
    assert evaluated.skipped == {"corrupt_video": 2}


def test_validation_decodes_the_stored_frames(corrupt, formats, tmp_path):
    import shutil

    from dataprep.validate import validate

    for name, shards in (("corrupt", corrupt), ("frames", formats[0] / "frames")):  # copies: sizes.json is rewritten
        shutil.copytree(shards, tmp_path / name)
    invalid = validate(str(tmp_path / "corrupt"))["samples"]["invalid"]
    assert invalid == {"undecodable stored frame": 1, "stored frames not numbered 0..K-1": 1}
    assert validate(str(tmp_path / "frames"))["samples"]["invalid"] == {}


def test_add_frames_converts_old_shards_and_resumes(tmp_path):
    """`python -m dataprep add-frames`: the earlier format in, stored frames added, the clip kept
    byte for byte, an undecodable clip left out and counted, finished shards not redone."""
    old, _ = transcode(source_clip(), VideoOptions(video_size=SIDE, fps=None, keyframe_interval=None, frames=0))
    src, dst = tmp_path / "old", tmp_path / "new"
    samples = [{"__key__": f"{i:09d}", "txt": caption(i), "json": json.dumps({"key": f"{i:09d}"}).encode(), **old}
               for i in range(8)]
    samples[3]["mp4"] = old["mp4"][:300]  # cut off: no frame decodes
    write(src / "00000.tar", samples[:5])
    write(src / "00001.tar", samples[5:])
    run = [sys.executable, "-m", "dataprep", "add-frames", str(src), str(dst), "--threads", "2"]
    subprocess.run(run, cwd=REPO, check=True, capture_output=True)
    assert json.loads((dst / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 3}
    stats = json.loads((dst / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_resize"]) == (5, 4, 1)
    got = {s["__key__"]: s for t in sorted(dst.glob("*.tar")) for s in wds.WebDataset(str(t), shardshuffle=False)}
    assert sorted(got) == [f"{i:09d}" for i in range(8) if i != 3]
    for key, s in got.items():
        assert s["mp4"] == old["mp4"] and s["txt"].decode() == caption(int(key))
        assert json.loads(s["json"])["frame_indices"] == segment_middles(N_FRAMES, K)
        assert sorted(k for k in s if k.startswith("frame")) == [f"frame{i:02d}.jpg" for i in range(K)]
    cfg = tiny_config([], video_size=SIDE, num_frames=K)
    converted = list(build_eval_samples(str(dst / "00000.tar"), "video", cfg))
    plain = list(build_eval_samples(str(src / "00000.tar"), "video", cfg))
    assert [k for k, _, _ in converted] == [k for k, _, _ in plain]
    for (_, a, _), (_, b, _) in zip(converted, plain):
        assert np.abs(to_pixels(a) - to_pixels(b)).mean() < 2
    stamps = {p.name: p.stat().st_mtime_ns for p in dst.glob("0*")}
    (dst / "00001_stats.json").unlink()
    subprocess.run(run, cwd=REPO, check=True, capture_output=True)
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("00000*")} == {
        n: t for n, t in stamps.items() if n.startswith("00000")}
    assert (dst / "00001.tar").stat().st_mtime_ns != stamps["00001.tar"]
