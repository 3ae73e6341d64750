"""Zero-shot retrieval evaluation of a trained model, without DeepSpeed.

    python -m pipeline.evaluate --checkpoint outputs/run --data eval/{00000..00001}.tar
    python -m pipeline.evaluate --checkpoint model_fp32.pt --config outputs/run/config.yaml \\
        --data ../shared/data/coco_239/captions.jsonl --rerank-k 16
    torchrun --nproc_per_node 2 -m pipeline.evaluate ...     # features spread over ranks

--checkpoint is a run's output directory (its newest complete checkpoint), a step_* directory, or a
consolidated fp32 file (`python -m pipeline.checkpoint`). The config defaults to the run's
config.yaml; dotted overrides apply on top (e.g. eval.batch_size=128).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from pipeline import checkpoint, distributed, retrieval  # noqa: E402
from pipeline.config import ConfigError, load_config, model_differences, to_dict  # noqa: E402
from pipeline.data import load_tokenizer  # noqa: E402
from pipeline.model import build_model  # noqa: E402

log = logging.getLogger("pipeline.evaluate")


def _run_config_path(ckpt: Path) -> Path | None:
    """config.yaml of the run a checkpoint belongs to: for an fp32 file the `<file>.yaml` that
    `pipeline.checkpoint` writes beside it, else a config.yaml in its folder; for a run or step_*
    directory the run's."""
    if ckpt.is_file():
        candidates = [ckpt.with_suffix(".yaml"), ckpt.parent / "config.yaml"]
    else:
        candidates = [d / "config.yaml" for d in (ckpt, ckpt.parent, ckpt.parent.parent)]
    return next((c for c in candidates if c.is_file()), None)


def find_run_config(ckpt: Path) -> Path:
    path = _run_config_path(ckpt)
    if path is None:
        raise ConfigError(f"no config.yaml found beside {ckpt}: pass --config")
    return path


def saved_run_config(ckpt: Path) -> dict | None:
    """The config a checkpoint was trained with (see _run_config_path); None when none is found."""
    path = _run_config_path(ckpt)
    return yaml.safe_load(path.read_text()) if path is not None else None


def check_model_section(ckpt, cfg, allowed: tuple[str, ...] = ()) -> None:
    """Refuse a config whose model section differs from the checkpoint's run (named keys): weights
    of another geometry can load and give other numbers silently (e.g. another head count).
    `allowed`: keys that may differ (fine-tuning resamples positions to its `model.vision.image_size`)."""
    saved = saved_run_config(Path(ckpt))
    if saved is None or "model" not in saved:
        log.warning("%s: no config of its run found, so the model section cannot be checked", ckpt)
        return
    diffs = [d for d in model_differences(saved["model"], to_dict(cfg)["model"]) if d.split(":")[0] not in allowed]
    if diffs:
        raise ConfigError(f"{ckpt} was trained with another model section: " + "; ".join(diffs)
                          + ". Use the run's config (the default without --config) or set these keys to its values.")


def load_model(ckpt: str, cfg, device) -> torch.nn.Module:
    """The model with weights from a consolidated fp32 file or a DeepSpeed checkpoint directory."""
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    check_model_section(path, cfg)
    model = build_model(cfg)
    if path.is_file():
        checkpoint.load_fp32(model, path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.load_fp32(model, checkpoint.consolidate(path, Path(tmp) / "fp32.pt"))
    return model.to(device).eval()


def evaluate(ckpt: str, data: str, cfg, modality: str, folder=None, rerank_k=None, num_samples=None) -> dict:
    device = torch.device("cuda", distributed.detect().local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(ckpt, cfg, device)
    samples = retrieval.load_eval_set(data, modality, cfg, folder, num_samples)
    return retrieval.evaluate_retrieval(model, samples, load_tokenizer(cfg.data.tokenizer), cfg, device, rerank_k)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="eval shards or annotation file (default: eval.data of the config)")
    p.add_argument("--modality", choices=["image", "video"], help="default: eval.modality of the config")
    p.add_argument("--folder", help="media folder of an annotation file (default: the file's folder)")
    p.add_argument("--config", help="config name or YAML (default: the run's config.yaml)")
    p.add_argument("--rerank-k", type=int, help="ITM re-ranks the top k (0 = ITC only)")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.config or find_run_config(Path(args.checkpoint)), args.overrides)
    env = distributed.detect()
    if env.world_size > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                rank=env.rank, world_size=env.world_size)
    data, modality = args.data or cfg.eval.data, args.modality or cfg.eval.modality
    if not data:
        raise ConfigError("no eval set: pass --data or set eval.data")
    metrics = evaluate(args.checkpoint, data, cfg, modality, args.folder, args.rerank_k, args.num_samples)
    if distributed.is_main():
        print(retrieval.format_metrics(metrics))
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2))
    if distributed.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
