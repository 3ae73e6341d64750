"""The embedded default in one call: generate, serve on loopback, download, shard and validate.

    from dataprep.demo_corpus import build_demo_corpus
    paths = build_demo_corpus("demo_out/data", n_images=2000, n_videos=200, seed=0)
    paths["images_train"]  # a shard folder: 00000.tar ..., sizes.json, report.json

It runs the shipped synthetic_images and synthetic_videos configs through the same stages as a
real corpus (img2dataset for the images, the PyAV stage for the videos).
"""

from __future__ import annotations

from pathlib import Path

from .common import DataprepError
from .config import load_config
from .stages import run_splits, synthetic_source
from .shapes import vocabulary


def build_demo_corpus(out_dir: str | Path, n_images: int = 2000, n_videos: int = 200, seed: int = 0,
                      n_eval_images: int = 200, n_eval_videos: int = 40, image_size: int = 64,
                      video_size: int = 64, num_frames: int = 16, fps: int = 8, processes: int = 2,
                      threads: int = 16, train_shards: int = 8) -> dict:
    """Build train and eval shards of synthetic images and videos under `out_dir`.

    Returns {"synthetic", "images_train", "images_eval", "videos_train", "videos_eval": folders,
    "reports": {name: validation report}, "vocabulary": [words]}. Raises DataprepError if any
    shard folder fails validation. The train splits are cut into `train_shards` shards, enough for
    every rank and loader worker of a small run to read its own. Calling it again reuses finished
    work; with other sizes or seed it rebuilds the shards. Two processes by default: img2dataset
    replaces each worker process after 5 shards, and a new one costs a fresh interpreter start.
    """
    out_dir = Path(out_dir)
    synthetic = {"root": str(out_dir / "synthetic"), "n_images": n_images, "n_videos": n_videos,
                 "n_eval_images": n_eval_images, "n_eval_videos": n_eval_videos, "seed": seed,
                 "image_size": image_size, "video_size": video_size, "num_frames": num_frames, "fps": fps}
    common = {"data_root": str(out_dir), "synthetic": synthetic, "processes": processes,
              "threads": threads, "table_changed": "fresh"}
    images = load_config("synthetic_images", {**common, "image_size": image_size,
                                              "shard_size": max(1, -(-n_images // train_shards))})
    videos = load_config("synthetic_videos", {**common, "video_size": video_size, "fps": fps,
                                              "max_duration": num_frames / fps,
                                              "shard_size": max(1, -(-n_videos // train_shards))})
    reports = {}
    with synthetic_source(images) as paths:
        for kind, cfg in (("images", images), ("videos", videos)):
            for split, report in run_splits(cfg).items():
                reports[f"{kind}_{split}"] = report
    failed = {name: r["errors"] for name, r in reports.items() if not r["ok"]}
    if failed:
        raise DataprepError(f"demo corpus failed validation: {failed}")
    return {
        "synthetic": paths["root"],
        "images_train": images.output_dir,
        "images_eval": images.eval_output_dir,
        "videos_train": videos.output_dir,
        "videos_eval": videos.eval_output_dir,
        "reports": reports,
        "vocabulary": vocabulary(),
    }
