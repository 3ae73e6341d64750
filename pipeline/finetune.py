"""Fine-tuning entry point: VQAv2, NLVR2, image-text and video-text retrieval from a pre-trained model.

    deepspeed pipeline/finetune.py --task vqa --config finetune_vqa --init outputs/pretrain \\
        task.train=... task.val=... task.media_root=/data/coco task.answers=answers.json
    torchrun --nproc_per_node 8 pipeline/finetune.py --task nlvr2 --config finetune_nlvr2 --init model_fp32.pt
    python slurm/submit.py --task retrieval --config finetune_retrieval ...     # the same on SLURM

The same engine, checkpoints (atomic, auto-resume), monitor and launchers as pre-training
(pipeline/train/trainer.py). Every `train.eval_every` steps and at the end the val split is evaluated
(TensorBoard `eval/val/*`); the best checkpoint by the task's metric is kept (checkpoints/best.json).
At the end the best weights are evaluated on val and test, `metrics.json` is written, and the test
predictions (VQA: the evaluation server's format) go to `task.predictions`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

from pipeline import distributed  # noqa: E402
from pipeline.config import Config, ConfigError  # noqa: E402
from pipeline.data import load_tokenizer  # noqa: E402
from pipeline.data.tokenizer import check_tokenizer  # noqa: E402
from pipeline.tasks import get_task  # noqa: E402
from pipeline.tasks.common import TaskLoader, load_pretrained, predict  # noqa: E402
from pipeline.train import checkpoint, process, trainer  # noqa: E402
from pipeline.train.preflight import check_model_inputs, require_local_or_hub  # noqa: E402

log = logging.getLogger("pipeline.finetune")
HEADLINE = ("vqa_score", "accuracy", "consistency", "itc_r_mean", "itc_itm_r_mean", "rank_r_mean", "chance_r_mean",
            "n_scored")


class Runner:
    """One task's data, model factory, evaluation and final report, for `trainer.fit`."""

    def __init__(self, cfg: Config):
        if not cfg.task.name:
            raise ConfigError("task.name is empty: pass --task vqa|nlvr2|retrieval")
        if cfg.train.contrastive_accum:
            raise ConfigError("train.contrastive_accum applies to pre-training only")
        if cfg.task.init and not Path(cfg.task.init).exists():
            raise ConfigError(f"task.init={cfg.task.init!r}: no such run directory, checkpoint or file")
        if cfg.task.init:  # fine-tuning resamples positions to its own image size; the rest must match
            checkpoint.check_model_section(cfg.task.init, cfg, allowed=("model.vision.image_size",))
        check_model_inputs(cfg)
        require_local_or_hub(cfg.data.tokenizer, "data.tokenizer", "tokenizer_config.json")
        self.cfg, self.module = cfg, get_task(cfg.task.name)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_tokenizer(self.tokenizer, cfg.model.text)
        self.task = self.module.Task(cfg, self.tokenizer)
        self.splits = {s: self.module.read_split(cfg, s) for s in ("train", "val", "test")}
        if not self.splits["train"]:
            raise ConfigError(f"task.train={cfg.task.train!r}: no training records")
        self.task.bind_train(self.splits["train"])
        self.out = Path(cfg.train.output_dir)

    # ---- for trainer.fit
    def make_model(self):
        model = self.task.build_model()
        resuming = checkpoint.resolve(self.out, self.cfg.train.resume) is not None
        if self.cfg.task.init and not resuming:  # a resumed run takes its weights from its checkpoint
            info = load_pretrained(model, self.cfg.task.init, tuple(model.task_params), self.out)
            if distributed.is_main():
                print(f"initialised from {self.cfg.task.init}: {info['loaded']} tensors, new: "
                      f"{sorted({k.split('.')[0] for k in info['new']}) or 'none'}", flush=True)
        return model

    def make_loader(self, rank: int, world: int) -> TaskLoader:
        return TaskLoader(self.splits["train"], self.task.make_sample, self.task.collate, self.cfg.data.batch_size,
                          rank, world, self.cfg.data.seed, self.cfg.data.workers)

    def evaluate_split(self, model, split: str) -> tuple[dict, dict | None]:
        records = self.splits[split]
        if hasattr(self.task, "evaluate_items"):
            return self.task.evaluate_items(model, records), None
        device = next(model.parameters()).device
        preds, skipped = predict(model, records, self.task.make_sample, self.task.collate, self.task.run_batch,
                                 self.cfg.eval.batch_size, device)
        metrics = self.task.metrics(preds, records)
        metrics.update({f"skipped/{k}": v for k, v in skipped.items()})
        return metrics, preds

    def evaluate(self, model, cfg, step) -> dict:
        metrics, _ = self.evaluate_split(model, "val")
        if distributed.is_main():
            log.info("step %d val: %s", step, {k: round(v, 2) for k, v in metrics.items()})
        return {f"val/{k}": v for k, v in metrics.items()}

    def best(self):
        if not self.splits["val"]:
            return None
        key, mode = self.task.best
        return (f"eval/val/{self.cfg.task.metric}", mode) if self.cfg.task.metric else (key, mode)

    def finish(self, engine, summary: dict) -> None:
        """Best weights -> val and test metrics, metrics.json and the test predictions."""
        best = summary.get("best")
        if best:
            with checkpoint.safe_torch_load():
                engine.load_checkpoint(str(checkpoint.checkpoint_root(self.out)), tag=best["tag"], load_module_only=True)
        report = {"task": self.cfg.task.name, "init": self.cfg.task.init, "steps": summary["step"],
                  "weights": best["tag"] if best else checkpoint.tag_for(summary["step"]), "best": best}
        for split in ("val", "test"):
            if self.splits[split]:
                metrics, preds = self.evaluate_split(engine.module, split)
                report[split] = metrics
                if split == "test" and preds is not None and distributed.is_main():
                    out = self.out / self.cfg.task.predictions
                    out.write_text(json.dumps(self.task.prediction_file(preds, self.splits[split])))
                    report["predictions"] = str(out)
        if distributed.is_main():
            checkpoint.write_json(self.out / "metrics.json", report)
            headline = {s: {k: round(v, 2) for k, v in report[s].items() if k.split("/")[0] in HEADLINE}
                        for s in ("val", "test") if s in report}
            print(f"final metrics ({report['weights']}): {json.dumps(headline)}; all in {self.out / 'metrics.json'}",
                  flush=True)
        summary["metrics"] = report


def finetune(cfg: Config) -> dict:
    """Fine-tune to `cfg.train.steps`; returns trainer.fit's summary (with `metrics` once finished)."""
    runner = Runner(cfg)  # inputs are checked here, before any process group or model exists
    return trainer.fit(cfg, runner.make_model, runner.make_loader,
                       runner.evaluate if runner.splits["val"] else None, runner.best(), finish=runner.finish)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["vqa", "nlvr2", "retrieval"], help="sets task.name")
    p.add_argument("--config", required=True, help="config name (finetune_vqa, ...) or YAML path")
    p.add_argument("--init", help="pre-training run directory, step_* directory or fp32 file (task.init)")
    p.add_argument("--resume", help="auto | none | a step_* checkpoint directory (train.resume)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.train=train.json train.steps=1000")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.task, "task.name"), (args.init, "task.init"), (args.resume, "train.resume")):
        if flag:
            overrides.append(f"{key}={flag}")
    return process.run_entry_point(finetune, args.config, overrides, args.print_config)


if __name__ == "__main__":
    main()
    process.exit_now(0)  # the run is saved and closed: skip the slow interpreter teardown
