"""Zero-shot retrieval evaluation of a trained model, without DeepSpeed.

    python -m pipeline.evaluate --checkpoint outputs/run --data eval/{00000..00001}.tar
    python -m pipeline.evaluate --checkpoint model_fp32.pt --config outputs/run/config.yaml \\
        --data ../shared/data/coco_239/captions.jsonl --rerank-k 16
    torchrun --nproc_per_node 2 -m pipeline.evaluate ...     # features spread over ranks

--checkpoint is a run's output directory (its newest complete checkpoint), a step_* directory, or a
consolidated file (`python -m pipeline.train.checkpoint RUN --out model.safetensors`). The config defaults to
the run's (its config.yaml, or the one a safetensors file carries); dotted overrides apply on top (e.g.
eval.batch_size=128).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline import distributed, zeroshot  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data import load_tokenizer  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.train import checkpoint  # noqa: E402

log = logging.getLogger("pipeline.evaluate")


def load_model(ckpt: str, cfg, device) -> torch.nn.Module:
    """The model with weights from a consolidated file (safetensors or torch) or a DeepSpeed checkpoint
    directory, after its run's model section was checked against `cfg`."""
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    checkpoint.check_model_section(path, cfg)
    model = build_model(cfg)
    state = checkpoint.read_weights(path)[0] if path.is_file() else checkpoint.consolidated_state(path)[0]
    model.load_state_dict(state)
    return model.to(device).eval()


def evaluate(ckpt: str, data: str, cfg, modality: str, folder=None, rerank_k=None, num_samples=None) -> dict:
    device = torch.device("cuda", distributed.detect().local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(ckpt, cfg, device)
    samples = zeroshot.load_eval_set(data, modality, cfg, folder, num_samples)
    return zeroshot.evaluate_retrieval(model, samples, load_tokenizer(cfg.data.tokenizer), cfg, device, rerank_k)


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
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        text = checkpoint.run_config(Path(args.checkpoint))
        if text is None:
            raise ConfigError(f"no config of its run found with {args.checkpoint}: pass --config")
        cfg = load_config(None, args.overrides, text=text)
    env = distributed.detect()
    if env.world_size > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                rank=env.rank, world_size=env.world_size)
    data, modality = args.data or cfg.eval.data, args.modality or cfg.eval.modality
    if not data:
        raise ConfigError("no eval set: pass --data or set eval.data")
    metrics = evaluate(args.checkpoint, data, cfg, modality, args.folder, args.rerank_k, args.num_samples)
    if distributed.is_main():
        print(zeroshot.format_metrics(metrics))
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2))
    if distributed.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
