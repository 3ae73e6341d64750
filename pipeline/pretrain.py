"""Pre-training entry point: DeepSpeed ZeRO training of the SCL model on `cfg.data.sources`.

    deepspeed pipeline/pretrain.py --config tiny [--resume auto] [section.key=value ...]
    deepspeed --num_nodes 2 --hostfile hosts pipeline/pretrain.py --config base
    torchrun --nproc_per_node 8 pipeline/pretrain.py --config base train.zero_stage=3
    srun python pipeline/pretrain.py --config base          # rank/world from SLURM_* variables

In-process (Submitit): `train(load_config(...))`; a preemption handler calls `request_checkpoint()`
and `train` saves at the next step boundary and returns.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a file path from the repository root (`deepspeed pipeline/pretrain.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from pipeline import zeroshot  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data import TrainLoader  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.train import preflight, process, trainer  # noqa: E402

log = logging.getLogger("pipeline.pretrain")

request_checkpoint = trainer.request_checkpoint  # preemption handlers call this (slurm/submit.py)


def _eval_hook(cfg: Config):
    """Retrieval evaluation every `train.eval_every` steps when `eval.data` is set; else None."""
    if not (cfg.eval.data and cfg.train.eval_every > 0):
        return None
    return zeroshot.evaluate_during_training


def train(cfg: Config) -> dict:
    """Train to `cfg.train.steps` (or until `request_checkpoint()`); returns a summary dict.

    Collective: every rank of the launch calls it. Rank and world size come from the launcher's
    environment through `pipeline.distributed`.
    """
    inputs = {}  # the tokenizer and the resolved sources: checked once, before any process group exists

    def check():
        inputs["tokenizer"], inputs["sources"] = preflight.check_pretraining_inputs(cfg)

    def make_loader(rank, world):
        return TrainLoader(cfg, rank, world, inputs["tokenizer"], inputs["sources"])

    return trainer.fit(cfg, lambda: build_model(cfg), make_loader, _eval_hook(cfg), preflight=check)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config name (tiny, base) or YAML path")
    p.add_argument("--resume", help="auto | none | a step_* checkpoint directory (overrides train.resume)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # The deepspeed launcher appends --local_rank; the value is read from LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=1000")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    return process.run_entry_point(train, args.config, overrides, args.print_config)


if __name__ == "__main__":
    main()
    process.exit_now(0)  # the run is saved and closed: skip the slow interpreter teardown
