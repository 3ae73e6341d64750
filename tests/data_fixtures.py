"""Helpers for the data tests: real shards written with webdataset's TarWriter, a tiny tokenizer."""
from __future__ import annotations

import functools
import http.server
import io
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
from PIL import Image
from webdataset import TarWriter

from pipeline.config import load_config

WORDS = ("a dog cat man woman child horse bird car tree red blue green small big runs sits "
         "on the in with near beach park street table field water sky").split()


def caption(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=6))


def image_bytes(value, size=(48, 40), fmt="JPEG") -> bytes:
    """A flat image of grey level `value` (recognisable after decoding), or of an (r, g, b) colour."""
    buf = io.BytesIO()
    Image.new("RGB", size, value if isinstance(value, tuple) else (value, value, value)).save(buf, format=fmt)
    return buf.getvalue()


def video_bytes(levels, size=(64, 48), fps=10, gop=4, codec="mpeg4") -> bytes:
    """A video whose frame t is flat grey `levels[t]`, a keyframe every `gop` frames."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.qmin, stream.codec_context.qmax = 1, 3  # near-lossless: levels survive
        for v in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), v, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, modality="image", index="sizes",
                 prefix="", media=None) -> list[str]:
    """Shards `<folder>/00000.tar`...; keys `<prefix><shard><i>`; index: "sizes", "stats" or None.

    `media(shard, i)` may give a sample's media bytes (None: a small flat image / 3-frame video).
    Returns the keys in writing order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys, sizes = [], {}
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        with TarWriter(str(folder / name)) as sink:
            for i in range(per_shard):
                key = f"{prefix}{s:04d}{i:05d}"
                data = media(s, i) if media is not None else None
                if data is None and modality == "image":
                    data = image_bytes((s * 37 + i * 11) % 256)
                elif data is None:
                    data = video_bytes([(s * 37 + i * 11 + 60 * t) % 256 for t in range(3)])
                ext = "jpg" if modality == "image" else "mp4"
                sink.write({"__key__": key, ext: data, "txt": caption(len(keys)),
                            "json": json.dumps({"key": key}).encode()})
                keys.append(key)
        sizes[name] = per_shard
        if index == "stats":
            (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    if index == "sizes":
        (folder / "sizes.json").write_text(json.dumps(sizes))
    return keys


def tiny_config(sources, **data):
    """The tiny config with these sources (dicts) and data overrides (key=value pairs)."""
    overrides = [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in data.items()]
    cfg = load_config("tiny", overrides)
    from pipeline.config import SourceConfig
    cfg.data.sources = [SourceConfig(**s) for s in sources]
    return cfg


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
