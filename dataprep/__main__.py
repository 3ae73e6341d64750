"""`python -m dataprep <stage> ...` (also installed as `scl-dataprep`).

    python -m dataprep list
    python -m dataprep annotations cc3m --input Train_GCC-training.tsv --data-root /data
    python -m dataprep download cc3m --data-root /data --processes 8 --threads 64
    python -m dataprep download cc12m --data-root /data --distributor spark --spark-master spark://node1:7077
    python -m dataprep validate cc3m --data-root /data          (or: validate --output-dir DIR)
    python -m dataprep run synthetic_images --data-root demo_out   (every stage, serving if synthetic)
    python -m dataprep synthetic --root demo_out/synthetic --base-url http://127.0.0.1:8000
    python -m dataprep serve demo_out/synthetic --port 8000
    python -m dataprep add-frames OLD_VIDEO_SHARDS NEW_DIR    (stored frames for older video shards)
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import DataprepError

# Flags that set a config value: (flag, config key, type).
_OVERRIDES = [
    ("--data-root", "data_root", str),
    ("--input", "input", str),
    ("--output-dir", "output_dir", str),
    ("--eval-input", "eval_input", str),
    ("--eval-output-dir", "eval_output_dir", str),
    ("--format", "format", str),
    ("--shard-size", "shard_size", int),
    ("--distributor", "distributor", str),
    ("--spark-master", "spark_master", str),
    ("--processes", "processes", int),
    ("--threads", "threads", int),
    ("--retries", "retries", int),
    ("--timeout", "timeout", float),
    ("--image-size", "image_size", int),
    ("--resize-mode", "resize_mode", str),
    ("--video-size", "video_size", int),
    ("--fps", "fps", float),
    ("--max-duration", "max_duration", float),
]


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("config", nargs=None if config_required else "?",
                   help="a config name (see `list`) or a path to a corpus YAML")
    for flag, key, typ in _OVERRIDES:
        p.add_argument(flag, dest=f"set_{key}", type=typ, metavar=key.upper())
    p.add_argument("--fresh", action="store_true", help="delete existing shards instead of resuming")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set reader.image_root=/data/coco --set min_image_size=64")


def _overrides(args: argparse.Namespace) -> dict:
    from .config import parse_settings

    out = {key: getattr(args, f"set_{key}") for _, key, _ in _OVERRIDES}
    if getattr(args, "fresh", False):
        out["incremental"] = False
    return {**out, **parse_settings(args.set, "--set")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dataprep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("list", help="the corpus configs shipped in dataprep/configs")
    for stage, text in [("annotations", "annotation file -> normalised table (_prep/annotations.parquet)"),
                        ("download", "table -> WebDataset shards (img2dataset for images, PyAV for videos)"),
                        ("run", "every stage (synthetic configs: generate and serve first), eval split too")]:
        _add_config_args(sub.add_parser(stage, help=text))
    p = sub.add_parser("validate", help="decode every shard; write sizes.json and report.json")
    _add_config_args(p, config_required=False)
    p.add_argument("--no-decode", action="store_true", help="check the tar structure only")
    sub.choices["run"].add_argument("--no-decode", action="store_true", help="validate without decoding")
    p = sub.add_parser("synthetic", help="generate the embedded default corpus (no network)")
    p.add_argument("--root", required=True)
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--n-videos", type=int, default=200)
    p.add_argument("--n-eval-images", type=int, default=200)
    p.add_argument("--n-eval-videos", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--video-size", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the files will be served")
    p = sub.add_parser("tasks", help="write the shapes-world VQAv2 / NLVR2 / Karpathy retrieval sets")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    from .videos import add_frames_arguments

    add_frames_arguments(sub.add_parser("add-frames", help="copy video shards, adding stored frames (resumable)"))
    p = sub.add_parser("serve", help="serve a folder on 127.0.0.1 until Ctrl-C")
    p.add_argument("root")
    p.add_argument("--port", type=int, default=8000)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.stage == "list":
        from .config import available, load_config

        for name in available():
            cfg = load_config(name)
            print(f"{name:18} {cfg.modality:6} {cfg.format:9} {cfg.input}")
        return 0
    if args.stage == "synthetic":
        from .shapes import generate

        paths = generate(args.root, n_images=args.n_images, n_videos=args.n_videos,
                         n_eval_images=args.n_eval_images, n_eval_videos=args.n_eval_videos, seed=args.seed,
                         image_size=args.image_size, video_size=args.video_size, num_frames=args.num_frames,
                         fps=args.fps, base_url=args.base_url)
        for key, value in paths.items():
            print(f"[synthetic] {key}: {value}")
        return 0
    if args.stage == "tasks":
        from .shapes_tasks import build_task_sets

        print(json.dumps(build_task_sets(args.out, seed=args.seed, size=args.image_size), indent=1))
        return 0
    if args.stage == "add-frames":
        from .videos import add_frames_command

        return add_frames_command(args)
    if args.stage == "serve":
        from .serve import serve_forever

        serve_forever(args.root, args.port)
        return 0

    from . import stages
    from .config import CorpusConfig, load_config

    if args.stage == "validate" and args.config is None:
        if not args.set_output_dir:
            raise DataprepError("validate needs a config or --output-dir")
        cfg = CorpusConfig(name=args.set_output_dir, output_dir=args.set_output_dir)
    else:
        cfg = load_config(args.config, _overrides(args))
    if args.stage == "annotations":
        stages.annotations(cfg)
        return 0
    if args.stage == "download":
        summary = stages.download(cfg)
        return 0 if summary["attempted"] else 1
    if args.stage == "validate":
        return 0 if stages.validate_stage(cfg, decode=not args.no_decode)["ok"] else 1
    reports = stages.run(cfg, decode=not args.no_decode)
    return 0 if all(r["ok"] for r in reports.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except DataprepError as err:
        print(f"dataprep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dataprep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
