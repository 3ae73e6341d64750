"""Training-loader throughput against a minimal webdataset pipeline on the same shards, in one run.

The benchmark writes its own shards: photo-sized JPEGs (640x480) and 10 s h264 clips (596x336,
25 fps, B-frames, a keyframe every second; WebVid's clips are 5-35 s). Both pipelines run in one DataLoader worker, so the figures
are samples/s per worker:
- loader: pipeline.data.build_train_loader (random crop, caption choice, tokenising, MLM/SCL/patch masks);
- plain: wds.WebDataset -> decode -> resize -> to-tensor, batched (videos: PyAV decoding frames in
  order up to the last of T uniformly spaced frames), nothing else.

    python bench/bench_loader.py [--images 256] [--videos 32] [--sizes 224 288] [--repeats 2] [--out DIR]
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

from pipeline.config import SourceConfig, load_config  # noqa: E402
from pipeline.data import build_train_loader, train_tokenizer  # noqa: E402

WORDS = "a the dog cat man woman red blue runs sits on in near beach park street table".split()
BATCH, FRAMES = 8, 4
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


def make_shards(folder: Path, modality: str, n: int, per_shard: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng, captions, sizes = np.random.default_rng(seed), [], {}
    for shard in range(0, n, per_shard):
        name = f"{shard // per_shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(shard, min(n, shard + per_shard)):
                captions.append(" ".join(rng.choice(WORDS, 8)))
                media = {"jpg": photo(rng)} if modality == "image" else {"mp4": clip(rng)}
                sink.write({"__key__": f"{i:09d}", "txt": captions[-1], **media})
        sizes[name] = min(n, shard + per_shard) - shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return captions


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


def plain_pipeline(folder: Path, modality: str, size: int):
    ds = wds.WebDataset([str(p) for p in sorted(folder.glob("*.tar"))], shardshuffle=False)
    if modality == "image":
        ds = ds.decode("pil").map(lambda s: (to_tensor(s["jpg"], size)[None], s["txt"]))
    else:
        ds = ds.map(lambda s: (plain_video(s["mp4"], size), s["txt"].decode()))
    return ds.batched(BATCH, partial=False)


def timed(batches, n_batches: int) -> float:
    """Samples/s over `n_batches` batches, after the first (worker start-up) is out of the way."""
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 288])
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per pipeline; the best is kept")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_loader_"))
    t0 = time.perf_counter()
    counts = {"image": args.images, "video": args.videos}
    captions = []
    for modality, n in counts.items():
        captions += make_shards(root / modality, modality, n, 64 if modality == "image" else 8, seed=len(captions))
    tok = train_tokenizer(captions, root / "tok", vocab_size=500)
    print(f"shards written in {time.perf_counter() - t0:.0f}s to {root}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'modality':8} {'size':>4} {'loader/s':>9} {'plain/s':>8} {'ratio':>6}   (samples/s, 1 worker, batch {BATCH})")
    for modality, n in counts.items():
        for size in args.sizes:
            cfg = load_config("base", ["data.workers=1", f"data.batch_size={BATCH}", f"data.num_frames={FRAMES}",
                                       f"data.image_size={size}", f"data.video_size={size}", "data.sharding=split"])
            cfg.data.sources = [SourceConfig(name=modality, shards=str(root / modality), modality=modality)]
            n_batches = n // BATCH - 1
            ours, plain = [], []
            for _ in range(args.repeats):  # alternate, so that load from elsewhere hits both alike
                ours.append(timed(build_train_loader(cfg, 0, 1, tok), n_batches))
                plain.append(timed(DataLoader(plain_pipeline(root / modality, modality, size), batch_size=None,
                                              num_workers=1), n_batches))
            print(f"{modality:8} {size:>4} {max(ours):>9.1f} {max(plain):>8.1f} {max(ours) / max(plain):>6.2f}")


if __name__ == "__main__":
    main()
