"""The embedded default corpus: captioned images and videos of coloured shapes, no network needed.

Captions describe the pictures exactly with a vocabulary of a few dozen words, so image-text and
video-text retrieval are learnable by a tiny model on a CPU in minutes:

    images  "a red circle on the left", "a red circle above a blue square"
    videos  "a green triangle moving left"

`generate` writes the files plus annotation lists in the real corpus formats (CC3M-style TSV for
images, WebVid-style CSV for videos) whose URLs point at a base URL, normally a `LoopbackServer`
serving the same folder. Everything is deterministic from the seed. The eval split holds distinct
captions, so each eval caption has exactly one matching image or video.
"""

from __future__ import annotations

import csv
import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (245, 215, 40),
           "white": (235, 235, 235)}
# Where a single shape sits: (x range, y range) as fractions of the image side.
PLACES = {
    "on the left": ((0.2, 0.3), (0.3, 0.7)),
    "on the right": ((0.7, 0.8), (0.3, 0.7)),
    "at the top": ((0.3, 0.7), (0.2, 0.3)),
    "at the bottom": ((0.3, 0.7), (0.7, 0.8)),
}
# One canonical relation per layout ("above" but not "below"), so each picture has one caption.
RELATIONS = ("above", "to the left of")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = ("train", "eval")
VERSION = 2  # bump when the drawing changes, so cached corpora are regenerated


def vocabulary() -> list[str]:
    words = {"a", "moving", *SHAPES, *COLOURS, *MOTIONS}
    for phrase in (*PLACES, *RELATIONS):
        words.update(phrase.split())
    return sorted(words)


def _objects() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _image_spec(rng: random.Random) -> dict:
    """A random layout and its caption; two thirds of the images hold two shapes."""
    if rng.random() < 1 / 3:
        colour, shape = rng.choice(_objects())
        place = rng.choice(list(PLACES))
        return {"caption": f"a {colour} {shape} {place}",
                "objects": [(colour, shape, PLACES[place])]}
    (c1, s1), (c2, s2) = rng.sample(_objects(), 2)
    relation = rng.choice(RELATIONS)
    near, far, free = (0.22, 0.3), (0.7, 0.78), (0.3, 0.7)
    boxes = ((free, near), (free, far)) if relation == "above" else ((near, free), (far, free))
    return {"caption": f"a {c1} {s1} {relation} a {c2} {s2}",
            "objects": [(c1, s1, boxes[0]), (c2, s2, boxes[1])]}


def _video_spec(rng: random.Random) -> dict:
    colour, shape = rng.choice(_objects())
    motion = rng.choice(list(MOTIONS))
    return {"caption": f"a {colour} {shape} moving {motion}", "colour": colour, "shape": shape,
            "motion": motion}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float):
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render_image(spec: dict, size: int, rng: random.Random) -> Image.Image:
    grey = rng.randint(15, 60)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for colour, shape, (xr, yr) in spec["objects"]:
        cx, cy = rng.uniform(*xr) * size, rng.uniform(*yr) * size
        _draw_shape(draw, shape, colour, cx, cy, rng.uniform(0.11, 0.15) * size)
    return img


def render_video_frames(spec: dict, size: int, num_frames: int, rng: random.Random) -> list[np.ndarray]:
    """The shape crosses most of the frame in the named direction."""
    grey = rng.randint(15, 60)
    r = rng.uniform(0.11, 0.15) * size
    dx, dy = MOTIONS[spec["motion"]]
    across = rng.uniform(0.3, 0.7) * size  # the fixed coordinate
    start, end = 0.2 * size, 0.8 * size
    frames = []
    for t in range(num_frames):
        along = start + (end - start) * t / max(1, num_frames - 1)
        if dx:
            cx, cy = (along if dx > 0 else size - along), across
        else:
            cx, cy = across, (along if dy > 0 else size - along)
        img = Image.new("RGB", (size, size), (grey, grey, grey))
        _draw_shape(ImageDraw.Draw(img), spec["shape"], spec["colour"], cx, cy, r)
        frames.append(np.asarray(img))
    return frames


def encode_mp4(frames: list[np.ndarray], fps: int, path: Path) -> None:
    import av  # imported here: the image-only uses of this module need no video stack

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        # One encoder thread keeps the bytes identical from run to run.
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def distinct_captions() -> dict:
    """How many different captions each kind can have: the eval split cannot hold more."""
    n_obj = len(_objects())
    return {"images": n_obj * len(PLACES) + n_obj * (n_obj - 1) * len(RELATIONS),
            "videos": n_obj * len(MOTIONS)}


def _specs(make, n: int, rng: random.Random, distinct: bool) -> list[dict]:
    if not distinct:
        return [make(rng) for _ in range(n)]
    specs, seen = [], set()
    for _ in range(200 * max(n, 1)):  # distinct captions run out long before this bound
        if len(specs) == n:
            break
        spec = make(rng)
        if spec["caption"] not in seen:
            seen.add(spec["caption"])
            specs.append(spec)
    return specs


def generate(root: str | Path, n_images: int = 2000, n_videos: int = 200, n_eval_images: int = 200,
             n_eval_videos: int = 40, seed: int = 0, image_size: int = 64, video_size: int = 64,
             num_frames: int = 16, fps: int = 8, base_url: str = "http://127.0.0.1:8000") -> dict:
    """Write images/, videos/, manifest.json and the annotation lists under `root`.

    Files are re-rendered only when the parameters change; the lists are always rewritten for
    `base_url`, since a loopback server's port differs from run to run.
    """
    limits = distinct_captions()
    if n_eval_images > limits["images"] or n_eval_videos > limits["videos"]:
        raise ValueError(f"the eval split holds distinct captions: at most {limits['images']} images "
                         f"and {limits['videos']} videos")
    root = Path(root)
    params = {"n_images": n_images, "n_videos": n_videos, "n_eval_images": n_eval_images,
              "n_eval_videos": n_eval_videos, "seed": seed, "image_size": image_size,
              "video_size": video_size, "num_frames": num_frames, "fps": fps, "version": VERSION}
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest is None or manifest["params"] != params or not _files_present(root, manifest):
        manifest = _render(root, params)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return write_lists(root, base_url)


def _files_present(root: Path, manifest: dict) -> bool:
    return all((root / item["file"]).exists()
               for kind in ("images", "videos") for split in SPLITS for item in manifest[kind][split])


def _render(root: Path, params: dict) -> dict:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    manifest = {"params": params, "vocabulary": vocabulary(), "images": {}, "videos": {}}
    counts = {"train": (params["n_images"], params["n_videos"]),
              "eval": (params["n_eval_images"], params["n_eval_videos"])}
    for split_no, split in enumerate(SPLITS):
        n_img, n_vid = counts[split]
        # String seeds hash the same in every process, unlike Python's hash().
        rng = random.Random(f"{params['seed']}-{split}-images")
        items = []
        for i, spec in enumerate(_specs(_image_spec, n_img, rng, distinct=split == "eval")):
            name = f"images/{split}_{i:06d}.jpg"
            render_image(spec, params["image_size"], rng).save(root / name, quality=95)
            items.append({"file": name, "caption": spec["caption"], "key": f"{split}_{i:06d}"})
        manifest["images"][split] = items
        rng = random.Random(f"{params['seed']}-{split}-videos")
        items = []
        for i, spec in enumerate(_specs(_video_spec, n_vid, rng, distinct=split == "eval")):
            videoid = str((split_no + 1) * 1_000_000 + i)
            name = f"videos/{videoid}.mp4"
            frames = render_video_frames(spec, params["video_size"], params["num_frames"], rng)
            encode_mp4(frames, params["fps"], root / name)
            items.append({"file": name, "caption": spec["caption"], "key": videoid,
                          "duration": params["num_frames"] / params["fps"]})
        manifest["videos"][split] = items
    return manifest


def _iso_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


def write_lists(root: str | Path, base_url: str) -> dict:
    """(Re)write the annotation lists for `base_url`; returns the paths of everything."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    base = base_url.rstrip("/")
    paths = {"root": str(root), "manifest": str(root / "manifest.json")}
    for split in SPLITS:
        tsv = root / f"images_{split}.tsv"
        with open(tsv, "w", encoding="utf-8", newline="") as f:
            for item in manifest["images"][split]:
                f.write(f"{item['caption']}\t{base}/{item['file']}\n")
        paths[f"images_{split}"] = str(tsv)
        out = root / f"videos_{split}.csv"
        with open(out, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
            for item in manifest["videos"][split]:
                writer.writerow([item["key"], item["caption"], 0, "synthetic",
                                 _iso_duration(item["duration"]), f"{base}/{item['file']}"])
        paths[f"videos_{split}"] = str(out)
    return paths
