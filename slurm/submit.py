"""Submit the pre-training (or a fine-tuning task) as one multi-node SLURM job through Submitit.

    python slurm/submit.py --nodes 8                          # base recipe, 8 nodes x 8 GPUs
    python slurm/submit.py --task vqa --init /runs/scl-base --nodes 1 task.train=... ...  # fine-tuning
    python slurm/submit.py --nodes 8 --dry-run                # print the sbatch script, submit nothing
    python slurm/submit.py --config tiny --nodes 2 --gpus-per-node 0 train.steps=100   # CPU nodes
    python slurm/submit.py --cluster local --nodes 1 --gpus-per-node 2                 # this machine
    python slurm/submit.py --dataprep cc12m --data-root /data --nodes 8 --cpus-per-task 32 threads=64
                                                  # dataprep on a Spark cluster inside the job (slurm/spark_job.py)

One task per GPU. Each task takes its rank, local rank, world size and master (the first node) from
Submitit's JobEnvironment, exports them and calls `pipeline.pretrain.train` (with --task:
`pipeline.finetune.finetune`) in-process: no deepspeed
launcher, no ssh. When SLURM signals the job before its time limit (or on preemption), every rank
saves a checkpoint at the next step boundary, then the job requeues itself (at most --max-requeues
times) and the requeued job resumes from that checkpoint. Everything stays in the job directory:

    <output-dir>/config.yaml      the resolved config the job runs
    <output-dir>/submitit/        sbatch script, pickles, per-rank logs <job id>_<rank>_log.{out,err}
    <output-dir>/checkpoints/     DeepSpeed checkpoints (`latest` names the newest complete one)
    <output-dir>/tensorboard/     TensorBoard events

Submitting again into an existing job directory continues that job from its saved config and newest
checkpoint (command-line overrides apply on top, e.g. train.steps=200000); nothing is overwritten.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import shlex
import signal
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as `python slurm/submit.py`

import submitit  # noqa: E402
from submitit.slurm.slurm import _make_sbatch_string  # noqa: E402

from pipeline.config import ConfigError, batch_line, dump_config, load_config  # noqa: E402


class RequeueingJob(submitit.helpers.Checkpointable):
    """A job that SLURM's signal (time limit, preemption) requeues, at most `max_requeues` times."""

    max_requeues: int
    requeues: int = 0
    resume_hint = "submit again with the same --output-dir to continue from the last checkpoint"

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by Submitit on rank 0 once the work is saved: the same job again, or None to stop."""
        if self.requeues >= self.max_requeues:
            print(f"not requeued: all {self.max_requeues} requeues used; {self.resume_hint}", flush=True)
            return None
        again = copy.copy(self)
        again.requeues += 1
        return submitit.helpers.DelayedSubmission(again)


class PretrainJob(RequeueingJob):
    """One task of the job: `train()` on this task's rank; a requeue continues from the checkpoint."""

    def __init__(self, config: str, max_requeues: int):
        self.config = config  # the job directory's config.yaml (train.resume=auto)
        self.max_requeues = max_requeues
        self.requeues = 0

    def __call__(self) -> dict:
        import torch

        from pipeline import distributed, finetune, pretrain

        job = submitit.JobEnvironment()
        env = distributed.from_submitit(job)
        distributed.export_env(env)  # before DeepSpeed initialises
        logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("submitit").propagate = False  # it has its own handler
        print(f"rank {env.rank}/{env.world_size} (local {env.local_rank}) on {socket.gethostname()} "
              f"pid {os.getpid()}, master {env.master_addr}:{env.master_port}, requeue {self.requeues}",
              flush=True)

        # Submitit's own handler would checkpoint and requeue at once, in the middle of a step. The
        # signal only asks train() to save at the next step boundary (all ranks agree on it); the
        # handler runs once that checkpoint is complete.
        sig = job._usr_sig()
        submitit_handler = signal.signal(sig, lambda *_: pretrain.request_checkpoint())
        cfg = load_config(self.config)
        summary = finetune.finetune(cfg) if cfg.task.name else pretrain.train(cfg)
        summary.pop("metrics", None)  # the report is in <job dir>/metrics.json
        if distributed.is_initialized():
            torch.distributed.destroy_process_group()
        summary.update(rank=env.rank, world_size=env.world_size, node=job.node, requeues=self.requeues)
        if summary["stopped_early"] and summary["step"] < cfg.train.steps and callable(submitit_handler):
            # rank 0: self.checkpoint(), `scontrol requeue`, exit; the other ranks just return
            submitit_handler(sig, None)
        return summary


def parse_time(text: str) -> int:
    """A SLURM time limit (`72:00:00`, `3-00:00:00`, `1-12`, `90`, `90:30`) in whole minutes."""
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        h, m, s = parts + [0] * (3 - len(parts))
    elif len(parts) == 3:
        h, m, s = parts
    else:  # minutes[:seconds]
        h, m, s = 0, parts[0], parts[1] if len(parts) > 1 else 0
    seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
    if seconds <= 0:
        raise ValueError(text)
    return -(-seconds // 60)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config name or YAML path (default: base, or finetune_<task> with "
                                     "--task; an existing --output-dir keeps its saved config)")
    p.add_argument("--task", choices=("vqa", "nlvr2", "retrieval"), help="fine-tune this task (task.name)")
    p.add_argument("--init", help="fine-tuning: the pre-training run, step_* directory or fp32 file (task.init)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU, 1 on CPU nodes")
    p.add_argument("--cpus-per-task", type=int, help="default: data.workers + 1")
    p.add_argument("--mem-gb", type=int, help="memory per node (default: the cluster's)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--time", type=parse_time, default="72:00:00",
                   help="time limit, [days-]hours:minutes:seconds or minutes (default 72:00:00)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM asks the job to checkpoint")
    p.add_argument("--max-requeues", type=int, default=10, help="requeues after timeout or preemption")
    p.add_argument("--output-dir", help="the job directory (default: train.output_dir of the config)")
    p.add_argument("--job-name", default="scl-pretrain")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="local: Submitit's local executor, nodes x tasks-per-node tasks on this machine; "
                        "debug: one task in this process")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--dataprep", metavar="CORPUS", help="instead of training, prepare this corpus (a dataprep "
                   "config or YAML) on a Spark cluster started inside the job: one task per node, "
                   "--cpus-per-task cores each (default 8); overrides are dataprep settings, e.g. threads=64")
    p.add_argument("--data-root", help="with --dataprep: the corpus's data_root (a shared filesystem)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=1000")
    return p.parse_intermixed_args(argv)


def resolve_config(args):
    """(job directory, config): a new job from --config + overrides, or an existing one continued."""
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"task.name={args.task}")
        args.config = args.config or f"finetune_{args.task}"
    if args.init:
        overrides.append(f"task.init={Path(args.init).resolve()}")
    if any(o.split("=", 1)[0].strip() == "train.resume" for o in overrides):
        raise ConfigError("train.resume is always 'auto' for SLURM jobs (they resume from their own "
                          "checkpoints); start from another run's weights with a new job directory instead")
    job_dir = Path(args.output_dir or load_config(args.config or "base", overrides).train.output_dir).resolve()
    saved = job_dir / "config.yaml"
    if saved.is_file():
        if args.config:
            print(f"{job_dir} holds a job: continuing it with its saved config.yaml (--config ignored, "
                  "overrides apply on top)")
        base = saved
    else:
        base = args.config or "base"
    return job_dir, load_config(base, overrides + [f"train.output_dir={job_dir}", "train.resume=auto"])


def slurm_parameters(args, tasks: int, cpus: int) -> dict:
    """SlurmExecutor parameters (the keyword arguments of Submitit's sbatch template)."""
    params = dict(job_name=args.job_name, nodes=args.nodes, ntasks_per_node=tasks, cpus_per_task=cpus,
                  time=args.time, signal_delay_s=args.signal_delay, setup=python_path_setup())
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    return params


def tasks_per_node(args) -> int:
    return args.tasks_per_node or max(args.gpus_per_node, 1)


# Tasks unpickle PretrainJob from `slurm.submit`, wherever the job was submitted from.
def python_path_setup() -> list[str]:
    return [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]


def train_parameters(args, cfg) -> dict:
    return slurm_parameters(args, tasks_per_node(args), args.cpus_per_task or cfg.data.workers + 1)


def make_executor(args, params: dict, folder: Path):
    if args.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(**params)
    elif args.cluster == "local":
        # The tasks inherit this environment (a `setup` would put a shell between job id and controller).
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(tasks_per_node=args.nodes * params["ntasks_per_node"],
                                   gpus_per_node=args.nodes * args.gpus_per_node, timeout_min=args.time,
                                   signal_delay_s=args.signal_delay)
    else:
        executor = submitit.DebugExecutor(folder)
    return executor


def print_sbatch(args, params: dict, folder: Path) -> None:
    if args.cluster != "slurm":
        raise SystemExit("--dry-run prints the sbatch script of --cluster slurm")
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    print(_make_sbatch_string(command=command, folder=folder, **params))


def main(argv=None):
    args = parse_args(argv)
    if args.dataprep:
        return submit_dataprep(args)
    job_dir, cfg = resolve_config(args)
    folder = job_dir / "submitit"
    world = args.nodes * tasks_per_node(args) if args.cluster != "debug" else 1
    batch = batch_line(cfg, world)  # a global batch the world size does not divide fails here, before the queue
    if args.dry_run:
        print(batch)
        print_sbatch(args, train_parameters(args, cfg), folder)
        return None

    job_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, job_dir / "config.yaml")
    job = make_executor(args, train_parameters(args, cfg), folder).submit(
        PretrainJob(str(job_dir / "config.yaml"), args.max_requeues))
    if args.cluster == "debug":
        print(job.result())
        return job
    cancel = f"scancel {job.job_id}" if args.cluster == "slurm" else f"kill -INT {job.job_id}"
    print(f"submitted job {job.job_id} ({args.cluster}: {args.nodes} node(s) x {tasks_per_node(args)} "
          f"task(s) = world size {world})\n"
          f"batch:       {batch}\n"
          f"job dir:     {job_dir}\n"
          f"logs:        {job.paths.stdout}  {job.paths.stderr}\n"
          f"             (rank r: {folder}/{job.job_id}_<r>_log.out/.err)\n"
          f"tensorboard: tensorboard --logdir {job_dir / 'tensorboard'}\n"
          f"cancel:      {cancel}\n"
          f"resume:      the job requeues itself; to continue after it ends, submit again with "
          f"--output-dir {job_dir}", flush=True)
    return job


def submit_dataprep(args):
    """One task per node: Spark master, workers and driver inside the allocation (slurm/spark_job.py)."""
    from dataprep.common import DataprepError
    from dataprep.config import load_config as load_corpus
    from dataprep.config import parse_settings

    # checked here, before the queue: the master's URL is only known inside the job
    try:
        overrides = parse_settings(args.overrides, "each --dataprep setting")
        if args.data_root:
            overrides["data_root"] = str(Path(args.data_root).resolve())
        cfg = load_corpus(args.dataprep, {**overrides, "distributor": "spark", "spark_master": "spark://unknown:0"})
    except DataprepError as err:
        raise SystemExit(f"--dataprep {args.dataprep}: {err}") from None
    job_dir = Path(args.output_dir or Path(cfg.data_root) / "jobs" / f"dataprep_{cfg.name}").resolve()
    folder = job_dir / "submitit"
    if args.job_name == "scl-pretrain":
        args.job_name = f"dataprep-{cfg.name}"
    args.gpus_per_node = 0
    params = slurm_parameters(args, 1, args.cpus_per_task or 8)
    if args.dry_run:
        print(f"dataprep {cfg.name} on Spark: {args.nodes} node(s) x {params['cpus_per_task']} cores -> "
              f"{cfg.output_dir}")
        return print_sbatch(args, params, folder)
    if args.cluster == "debug":
        raise SystemExit("--dataprep runs on --cluster slurm or local")
    from slurm.spark_job import DataprepJob

    memory = f"{max(1, args.mem_gb - 4)}g" if args.mem_gb else None  # leave the node's Python workers room
    job = make_executor(args, params, folder).submit(
        DataprepJob(str(Path(args.dataprep).resolve()) if Path(args.dataprep).is_file() else args.dataprep,
                    overrides, str(job_dir), args.max_requeues, memory))
    cancel = f"scancel {job.job_id}" if args.cluster == "slurm" else f"kill -INT {job.job_id}"
    print(f"submitted job {job.job_id} (dataprep {cfg.name} on Spark: {args.nodes} node(s), "
          f"{params['cpus_per_task']} cores each)\n"
          f"shards:      {cfg.output_dir}\n"
          f"job dir:     {job_dir}\n"
          f"logs:        {folder}/{job.job_id}_<task>_log.out/.err (task 0 runs the driver)\n"
          f"spark:       master URL and web UI in {job_dir / 'spark' / 'master.json'} and task 0's log once "
          f"it runs;\n             daemon logs {job_dir / 'spark' / 'logs'}, executor logs "
          f"{job_dir / 'spark' / 'work'}/*/app-*/*/stderr\n"
          f"cancel:      {cancel}\n"
          f"resume:      the job requeues itself; after it ends, the same command writes only missing shards",
          flush=True)
    return job


if __name__ == "__main__":
    from slurm.submit import main as _main  # the class pickles as slurm.submit.PretrainJob

    _main()
