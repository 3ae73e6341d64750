"""Training-loader throughput against a minimal webdataset pipeline on the same shards, in one run.

The benchmark writes its own shards: photo-sized JPEGs (640x480), and from the same source clips
(10 s h264, 596x336, 25 fps, B-frames, a keyframe every second, as WebVid's are 596x336 and 5-35 s;
a panning pattern of random blocks, harder to compress and decode than footage; or the mp4s of
`--clips DIR`, e.g. real WebVid clips) one shard folder per video format:
- mp4-source: the clips as they are (shards of clips no stage re-encoded);
- mp4-prep-old: dataprep's video stage as it was (x264's own GOP with B-frames, no stored frames);
- mp4-prep: the stage's clip now (a keyframe every 4 frames, no B-frames), without its frames;
- frames-prep: the stage's sample now (that clip + 8 JPEG frames): the loader reads the frames.
The stage's clips are made by dataprep.videos.transcode itself, at `--video-size` (short side).

Both pipelines run in one DataLoader worker, so the figures are samples/s per worker:
- loader: pipeline.data.build_train_loader (random crop, caption choice, tokenising, MLM/SCL/patch masks);
- plain: wds.WebDataset -> decode -> resize -> to-tensor, batched (clips: PyAV decoding frames in
  order up to the last of T uniformly spaced frames; frames: the T middle ones), nothing else.
"video/image" is the loader's video samples/s over its image samples/s at the same size, by wall
clock (1 DataLoader worker) and by CPU time (the loader run in-process, samples per CPU second: what
a worker with a core to itself would give, and far steadier than wall clock on a shared machine).

    python bench/bench_loader.py [--images 256] [--videos 48] [--sizes 224 288] [--repeats 2]
                                 [--clips DIR] [--video-size 224] [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dataprep.videos import VideoOptions, transcode  # noqa: E402
from pipeline.concepts import RANDOM_BASE  # noqa: E402
from pipeline.config import SourceConfig, load_config  # noqa: E402
from pipeline.data import build_train_loader, train_tokenizer  # noqa: E402
from pipeline.data.video import stored_frames  # noqa: E402

WORDS = "a the dog cat man woman red blue runs sits on in near beach park street table".split()
BATCH, FRAMES = 8, 4
DISTINCT_CLIPS = 8  # source clips made (or read) and cycled: transcoding each costs about a second
VIDEO_FORMATS = ("mp4-source", "mp4-prep-old", "mp4-prep", "frames-prep")
from _media import photo  # noqa: E402


def clip(rng, seconds=10, fps=25) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "g": str(fps)})
        s.width, s.height, s.pix_fmt = 596, 336, "yuv420p"
        base = rng.integers(0, 255, (336 // 8, 596 // 4 + seconds * fps, 3), dtype=np.uint8)
        big = np.kron(base, np.ones((8, 4, 1), np.uint8))
        for t in range(seconds * fps):
            frame = np.ascontiguousarray(big[:, 4 * t: 4 * t + 596])  # a pattern panning left
            out.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(s.encode())
    return buf.getvalue()


def video_formats(sources: list[bytes], video_size: int) -> dict[str, list[dict]]:
    """Each source clip's sample media in every format (the stage's own transcode for the prep ones)."""
    old = VideoOptions(video_size=video_size, keyframe_interval=None, frames=0)
    new = VideoOptions(video_size=video_size)
    out = {f: [] for f in VIDEO_FORMATS}
    for data in sources:
        prepared = transcode(data, new)[0]
        out["mp4-source"].append({"mp4": data})
        out["mp4-prep-old"].append(transcode(data, old)[0])
        out["mp4-prep"].append({"mp4": prepared["mp4"]})
        out["frames-prep"].append(prepared)
    return out


def make_shards(folder: Path, n: int, per_shard: int, seed: int, media) -> list[str]:
    """Shards of n samples; `media(rng, i)` gives sample i's media members."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, captions, sizes = np.random.default_rng(seed), [], {}
    for shard in range(0, n, per_shard):
        name = f"{shard // per_shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(shard, min(n, shard + per_shard)):
                captions.append(" ".join(rng.choice(WORDS, 8)))
                sink.write({"__key__": f"{i:09d}", "txt": captions[-1], **media(rng, i)})
        sizes[name] = min(n, shard + per_shard) - shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return captions


def kib_per_sample(folder: Path, n: int) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.tar")) / n / 1024


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize and torchvision's ToTensor: float [3, H, W] in [0, 1]."""
    x = np.array(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    return torch.from_numpy(x.transpose(2, 0, 1))


def plain_video(data: bytes, size: int) -> torch.Tensor:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        want = {int((i + 0.5) * stream.frames / FRAMES) for i in range(FRAMES)}
        frames = []
        for i, f in enumerate(c.decode(stream)):
            if i in want:
                frames.append(to_tensor(f.to_image(), size))
            if i >= max(want):
                break
    return torch.stack(frames)


def plain_frames(sample: dict, size: int) -> torch.Tensor:
    stored = stored_frames(sample)
    want = [int((i + 0.5) * len(stored) / FRAMES) for i in range(FRAMES)]
    return torch.stack([to_tensor(Image.open(io.BytesIO(stored[i])), size) for i in want])


def plain_pipeline(folder: Path, modality: str, size: int):
    ds = wds.WebDataset([str(p) for p in sorted(folder.glob("*.tar"))], shardshuffle=False)
    if modality == "image":
        ds = ds.decode("pil").map(lambda s: (to_tensor(s["jpg"], size)[None], s["txt"]))
    elif modality == "frames":
        ds = ds.map(lambda s: (plain_frames(s, size), s["txt"].decode()))
    else:
        ds = ds.map(lambda s: (plain_video(s["mp4"], size), s["txt"].decode()))
    return ds.batched(BATCH, partial=False)


def timed(batches, n_batches: int, clock=time.perf_counter) -> float:
    """Samples per second of `clock` over `n_batches` batches, after the first (worker start-up)."""
    it = iter(batches)
    next(it)
    start = clock()
    for _ in range(n_batches):
        next(it)
    return n_batches * BATCH / (clock() - start)


def source_clips(folder: str, n: int) -> list[bytes]:
    if folder:
        paths = sorted(Path(folder).glob("*.mp4"))[:n]
        if not paths:
            raise SystemExit(f"--clips {folder}: no *.mp4 there")
        return [p.read_bytes() for p in paths]
    rng = np.random.default_rng(1)
    return [clip(rng) for _ in range(n)]


def rates(root: Path, name: str, n: int, size: int, tok) -> tuple[float, float, float]:
    """On the shards in root/name, one run each: loader and plain samples/s (wall clock, 1 worker), and
    the loader's samples per CPU second in this process (its cost, whatever the load from elsewhere)."""
    modality = "image" if name == "image" else "video"
    cfg = load_config("base", [*RANDOM_BASE, "data.workers=1", f"data.batch_size={BATCH}",
                               f"data.num_frames={FRAMES}",
                               f"data.image_size={size}", f"data.video_size={size}", "data.sharding=split"])
    cfg.data.sources = [SourceConfig(name=name, shards=str(root / name), modality=modality)]
    plain_kind = "frames" if name.startswith("frames") else modality
    n_batches = n // BATCH - 1
    ours = timed(build_train_loader(cfg, 0, 1, tok), n_batches)
    plain = timed(DataLoader(plain_pipeline(root / name, plain_kind, size), batch_size=None, num_workers=1),
                  n_batches)
    cfg.data.workers = 0
    cpu = timed(build_train_loader(cfg, 0, 1, tok), n_batches, time.process_time)
    return ours, plain, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 288])
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all pipelines; each one's best is kept")
    ap.add_argument("--clips", default="", help="a folder of source mp4s (e.g. WebVid's); default: synthetic clips")
    ap.add_argument("--video-size", type=int, default=VideoOptions.video_size,
                    help="short side of the dataprep formats' clips and frames")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_loader_"))
    t0 = time.perf_counter()
    counts = {"image": args.images, **{f: args.videos for f in VIDEO_FORMATS}}
    captions = make_shards(root / "image", args.images, 64, 0, lambda rng, i: {"jpg": photo(rng)})
    formats = video_formats(source_clips(args.clips, min(args.videos, DISTINCT_CLIPS)), args.video_size)
    for name in VIDEO_FORMATS:  # the same captions and clips, in the same order, in every format
        samples = formats[name]
        video_captions = make_shards(root / name, args.videos, 8, 1, lambda rng, i: samples[i % len(samples)])
    captions += video_captions
    tok = train_tokenizer(captions, root / "tok", vocab_size=500)
    print(f"shards written in {time.perf_counter() - t0:.0f}s to {root}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; clips: {args.clips or 'synthetic'}, "
          f"dataprep formats at short side {args.video_size}")
    print(f"{'format':12} {'size':>4} {'KiB/sample':>10} {'loader/s':>9} {'plain/s':>8} {'ratio':>6} "
          f"{'video/image':>11} {'loader/cpu-s':>12} {'video/image':>11}")
    print(f"{'':12} {'':>4} {'':>10} {'(wall clock, 1 worker)':>36} {'(CPU time, in-process)':>24}"
          f"   samples/s, batch {BATCH}, {FRAMES} frames")
    torch.set_num_threads(1)  # as in a DataLoader worker, for the in-process runs
    for size in args.sizes:
        best = {name: (0.0, 0.0, 0.0) for name in counts}
        for _ in range(args.repeats):  # rounds over every format, so that load from elsewhere hits all alike
            for name, n in counts.items():
                best[name] = tuple(map(max, best[name], rates(root, name, n, size, tok)))
        for name, n in counts.items():
            (ours, plain, cpu), (image, _, image_cpu) = best[name], best["image"]
            versus = ("", "") if name == "image" else (f"{ours / image:.2f}", f"{cpu / image_cpu:.2f}")
            print(f"{name:12} {size:>4} {kib_per_sample(root / name, n):>10.0f} {ours:>9.1f} {plain:>8.1f} "
                  f"{ours / plain:>6.2f} {versus[0]:>11} {cpu:>12.1f} {versus[1]:>11}", flush=True)


if __name__ == "__main__":
    main()
