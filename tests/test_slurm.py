"""`slurm/submit.py` on a real two-node SLURM cluster (scripts/slurm_local.sh: slurmctld + slurmd n1, n2).

Three jobs of the tiny config, 2 ranks with DeepSpeed on gloo, run side by side:
  A  `--cluster slurm --nodes 2`: runs to the end (12 steps).
  B  the same job, signalled (USR2, as SLURM does before the time limit) after step 2: every rank
     saves, the job requeues itself through SLURM and the requeued run resumes from that step.
  C  submitted again into A's directory once A is done, on Submitit's local executor (2 tasks) with
     more steps and --max-requeues 0: resumes from A's last checkpoint, is signalled, saves and stops.
Submitit reports UNKNOWN states without SLURM accounting: the tests read result pickles, logs,
checkpoints and TensorBoard events.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from train_fixtures import process_env, read_scalars, write_train_data

REPO = Path(__file__).resolve().parents[1]
SUBMIT = [sys.executable, str(REPO / "slurm" / "submit.py")]
STEPS, C_STEPS = 12, 40
TIMEOUT_S = 480  # per wait; a quiet machine needs well under half


# ---------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Starts the local cluster (installing SLURM where missing); yields the environment for jobs."""
    state = tmp_path_factory.mktemp("slurm")
    script = str(REPO / "scripts" / "slurm_local.sh")
    start = subprocess.run(["bash", script, "start", str(state)], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True, timeout=120)
        pytest.skip(f"the local SLURM cluster could not start:\n{start.stdout[-1500:]}{start.stderr[-1500:]}")
    env = process_env(SLURM_CONF=str(state / "slurm.conf"))
    try:
        yield env
    finally:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True, timeout=120)


# ---------------------------------------------------------------- helpers
def _submit(env: dict, out_file: Path, *args) -> str:
    # To a file, not a pipe: the local executor's job inherits the output and would hold a pipe open.
    with open(out_file, "w") as out:
        code = subprocess.run([*SUBMIT, *map(str, args)], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=120).returncode
    text = out_file.read_text()
    assert code == 0, text
    return re.search(r"submitted job (\S+)", text).group(1)


def _wait(condition, what: str, logs=()):
    deadline = time.time() + TIMEOUT_S
    while not condition():
        if time.time() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def _log(job_dir: Path, job_id: str, rank: int = 0, kind: str = "out") -> Path:
    return job_dir / "submitit" / f"{job_id}_{rank}_log.{kind}"


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _result(job_dir: Path, job_id: str, rank: int):
    """(outcome, value) that Submitit pickled for one task: ("success", summary) or ("error", traceback)."""
    with open(job_dir / "submitit" / f"{job_id}_{rank}_result.pkl", "rb") as f:
        return pickle.load(f)


def _in_queue(env: dict, job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    return bool(out.stdout.strip())


def _wait_slurm_job(env: dict, job_dir: Path, job_id: str) -> None:
    """Until the job has left the queue (a requeued job stays in it, pending) with rank 0's result."""
    result = job_dir / "submitit" / f"{job_id}_0_result.pkl"
    _wait(lambda: result.exists() and not _in_queue(env, job_id), f"job {job_id}",
          [_log(job_dir, job_id), _log(job_dir, job_id, 0, "err"), _log(job_dir, job_id, 1, "err")])


def _saved_at(log: str) -> int:
    return int(re.search(r"checkpoint requested: saved at step (\d+)", log).group(1))


# ---------------------------------------------------------------- the three jobs
@pytest.fixture(scope="module")
def jobs(slurm_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    config = write_train_data(root)
    common = ["--config", config, "--nodes", 2, "--gpus-per-node", 0, "--time", "10",
              f"train.steps={STEPS}", "train.save_every=100"]
    a_dir, b_dir = root / "a", root / "b"
    a_id = _submit(slurm_env, root / "a.txt", *common, "--output-dir", a_dir)
    b_id = _submit(slurm_env, root / "b.txt", *common, "--output-dir", b_dir, "--max-requeues", 1)

    def run_b():
        log = _log(b_dir, b_id)
        _wait(lambda: "step 2/" in _text(log), "job B's step 2", [log])
        # What SLURM sends before the time limit (`--signal=USR2@...`), to every task of the job.
        subprocess.run(["scancel", "--signal=USR2", b_id], env=slurm_env, check=True)
        _wait_slurm_job(slurm_env, b_dir, b_id)

    with ThreadPoolExecutor(1) as pool:
        b = pool.submit(run_b)
        _wait_slurm_job(slurm_env, a_dir, a_id)
        a_snapshot = {"scalars": read_scalars(a_dir), "latest": (a_dir / "checkpoints" / "latest").read_text(),
                      "files": sorted(str(p.relative_to(a_dir)) for p in a_dir.rglob("*") if p.is_file())}

        c_id = _submit(slurm_env, root / "c.txt", "--cluster", "local", "--nodes", 1, "--tasks-per-node", 2,
                       "--gpus-per-node", 0, "--time", "10", "--output-dir", a_dir, "--max-requeues", 0,
                       f"train.steps={C_STEPS}")
        c_log = _log(a_dir, c_id)
        try:
            _wait(lambda: re.search(r"^step 1[4-9]/", _text(c_log), re.M), "job C's step 14", [c_log])
            rank0_pid = int(re.search(r"^rank 0/2 .* pid (\d+)", _text(c_log), re.M).group(1))
            os.kill(rank0_pid, signal.SIGUSR2)  # any one rank: the ranks agree on stopping
            results = [a_dir / "submitit" / f"{c_id}_{rank}_result.pkl" for rank in (0, 1)]
            _wait(lambda: all(r.exists() for r in results), "job C", [c_log, _log(a_dir, c_id, 0, "err")])
        finally:
            try:
                os.kill(int(c_id), signal.SIGINT)  # the local executor's controller: stops its tasks
            except ProcessLookupError:
                pass
        b.result()
    return {"a": a_dir, "a_id": a_id, "a_snapshot": a_snapshot, "b": b_dir, "b_id": b_id, "c_id": c_id}


# ---------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_job_trains_on_both_nodes(jobs):
    a_dir, a_id = jobs["a"], jobs["a_id"]
    results = [_result(a_dir, a_id, rank) for rank in (0, 1)]
    assert [r[0] for r in results] == ["success", "success"], results
    assert [(r[1]["rank"], r[1]["world_size"], r[1]["node"]) for r in results] == [(0, 2, 0), (1, 2, 1)]
    assert results[0][1]["step"] == STEPS and not results[0][1]["stopped_early"]
    for rank in (0, 1):  # each task rendezvoused with the first node of the job
        assert re.search(rf"^rank {rank}/2 .* master n1:\d+", _log(a_dir, a_id, rank).read_text(), re.M)

    snap = jobs["a_snapshot"]
    final = f"step_{STEPS:08d}"
    assert snap["latest"] == final
    assert {f"checkpoints/{final}/rank_00000.pt", f"checkpoints/{final}/rank_00001.pt",
            f"checkpoints/{final}/complete.json", "config.yaml", f"submitit/{a_id}_submission.sh"} <= set(snap["files"])
    ranks_saved = {f.rsplit("/", 1)[1] for f in snap["files"] if re.match(r"checkpoints/step_\d+/rank_", f)}
    assert ranks_saved == {"rank_00000.pt", "rank_00001.pt"}
    loss = snap["scalars"]["loss/total"]
    assert sorted(loss) == list(range(1, STEPS + 1))
    # Job B ran the same config until its signal: the two multi-node launches computed the same
    # steps bit for bit. (That this config learns is shown against an lr=0 run on the same batches
    # in test_train_distributed.py: a batch's loss swings by +-1 around another's, so a 12-step
    # trend says nothing.)
    first_b = read_scalars(jobs["b"], sorted((jobs["b"] / "tensorboard").glob("events*"))[:1])["loss/total"]
    assert len(first_b) >= 2
    for step, value in first_b.items():
        assert value == loss[step], step
    assert all(math.isfinite(v) for v in loss.values())


@pytest.mark.slow
@pytest.mark.slurm
def test_signalled_job_requeues_itself_and_resumes_at_the_saved_step(jobs):
    b_dir, b_id = jobs["b"], jobs["b_id"]
    log = _log(b_dir, b_id).read_text()
    first, second = log.split("Requeued job", 1)
    k = _saved_at(first)
    assert 2 <= k < STEPS
    assert f"{b_id}_submission.sh" in os.listdir(b_dir / "submitit")
    assert re.search(r"^rank 0/2 .* requeue 1$", second, re.M)
    assert f"resumed from {b_dir / 'checkpoints' / f'step_{k:08d}'} at step {k}" in second

    outcome, summary = _result(b_dir, b_id, 0)
    assert outcome == "success", summary
    assert (summary["step"], summary["stopped_early"], summary["requeues"]) == (STEPS, False, 1)
    # The requeued run continues A's trajectory: weights, optimizer, loader and RNG all came back.
    events = sorted((b_dir / "tensorboard").glob("events*"))
    assert len(events) == 2
    after = read_scalars(b_dir, events[1:])["loss/total"]
    assert min(after) == k + 1 and max(after) == STEPS
    # Same world size: every random choice of a step is keyed or restored, so the losses are bit-identical.
    reference = jobs["a_snapshot"]["scalars"]["loss/total"]
    for step in range(k + 1, STEPS + 1):
        assert after[step] == reference[step], step


@pytest.mark.slow
@pytest.mark.slurm
def test_submitting_into_a_job_dir_resumes_and_max_requeues_bounds_it(jobs):
    a_dir, c_id = jobs["a"], jobs["c_id"]
    log = _log(a_dir, c_id).read_text()
    assert f"resumed from {a_dir / 'checkpoints' / f'step_{STEPS:08d}'} at step {STEPS}" in log
    k = _saved_at(log)
    assert STEPS < k < C_STEPS
    assert "not requeued: all 0 requeues used" in log
    outcome, error = _result(a_dir, c_id, 0)
    assert outcome == "error" and "Job not requeued" in error
    # A's files are all still there (new logs, events and checkpoints were added beside them) ...
    files = {str(p.relative_to(a_dir)) for p in a_dir.rglob("*") if p.is_file()}
    kept = {f for f in jobs["a_snapshot"]["files"] if not f.startswith("checkpoints/")}
    assert kept <= files
    assert len(list((a_dir / "tensorboard").glob("events*"))) == 2
    # ... and the job now runs the saved config with the new override on top.
    from pipeline.config import load_config

    cfg = load_config(a_dir / "config.yaml")
    assert (cfg.train.steps, cfg.train.save_every, cfg.train.output_dir) == (C_STEPS, 100, str(a_dir))
    assert (a_dir / "checkpoints" / "latest").read_text() == f"step_{k:08d}"


@pytest.mark.slow
@pytest.mark.slurm
def test_srun_job_at_its_time_limit_saves_its_step_and_resumes_bit_identically(slurm_env, tmp_path):
    """`srun python pipeline/pretrain.py` in a batch job of 2 nodes, stopped by SLURM at its 1-minute
    limit (SIGTERM to every task): the ranks save the step they were on and exit 75. Resumed from the
    job's last periodic checkpoint, a run recomputes the job's later steps bit for bit (the LR schedule
    is flat after warmup here, so it does not depend on train.steps)."""
    from pipeline.train import checkpoint
    from train_fixtures import finish, torchrun

    config = write_train_data(tmp_path)
    run, out = tmp_path / "run", tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=1
#SBATCH --output={out}
export PYTHONPATH={REPO} NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
cd {REPO}
srun {sys.executable} pipeline/pretrain.py --config {config} train.zero_stage=2 train.output_dir={run} \\
    train.steps=100000 train.min_lr_ratio=1.0 train.save_every=25 train.keep_last=3 train.log_every=1 \\
    train.max_requeues=0
""")
    sub = subprocess.run(["sbatch", "--parsable", str(script)], env=slurm_env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    _wait(lambda: "stopped by" in _text(out) and not _in_queue(slurm_env, job_id), f"job {job_id}", [out])
    log = out.read_text()
    for task in (0, 1):  # srun's report of each task
        assert re.search(rf"task {task}: Exited with exit code 75", log), log[-3000:]
    assert "not requeued: job" in log
    k = int(re.search(r"stopped by SIGTERM after saving step (\d+)", log).group(1))
    tag = run / "checkpoints" / f"step_{k:08d}"
    assert checkpoint.is_complete(tag) and checkpoint.verify(tag) == []
    periodic = (k - 1) // 25 * 25
    assert periodic >= 25, k
    again = tmp_path / "again"
    finish(torchrun(["pipeline/pretrain.py", "--config", config, "train.zero_stage=2", f"train.output_dir={again}",
                       f"train.steps={k}", "train.min_lr_ratio=1.0", "train.log_every=1", "train.save_every=1000",
                       f"--resume={run / 'checkpoints' / f'step_{periodic:08d}'}"], tmp_path / "again.log"),
            tmp_path / "again.log")
    job, resumed = read_scalars(run)["loss/total"], read_scalars(again)["loss/total"]
    assert sorted(resumed) == list(range(periodic + 1, k + 1))
    for step in resumed:
        assert resumed[step] == job[step], step


@pytest.mark.slow
@pytest.mark.slurm
def test_dataprep_job_runs_a_spark_cluster_inside_the_allocation(slurm_env, tmp_path):
    """`submit.py --dataprep` on 2 nodes: a Spark master and a worker per node start inside the job, both
    workers run tasks, the corpus is written and validated, and every daemon is gone afterwards."""
    pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install -e '.[spark]')")
    job_id = _submit(slurm_env, tmp_path / "submit.txt", "--dataprep", "synthetic_images", "--data-root",
                     tmp_path, "--nodes", 2, "--cpus-per-task", 1, "--time", "10", "synthetic.n_images=120",
                     "synthetic.n_videos=8", "synthetic.n_eval_images=8", "synthetic.n_eval_videos=4",
                     "shard_size=20", "threads=4")
    job_dir = tmp_path / "jobs" / "dataprep_synthetic_images"
    _wait_slurm_job(slurm_env, job_dir, job_id)
    outcomes = [_result(job_dir, job_id, rank) for rank in (0, 1)]
    assert [o[0] for o in outcomes] == ["success", "success"], outcomes
    assert outcomes[0][1]["ok"] and outcomes[0][1]["samples"] == {"train": 120, "eval": 8}

    daemons = [json.loads(line) for line in (job_dir / "spark" / "daemons.json").read_text().splitlines()]
    assert sorted((d["kind"], d["host"]) for d in daemons) == [("master", "n1"), ("worker", "n1"), ("worker", "n2")]
    assert all(not Path(f"/proc/{d['pid']}").exists() for d in daemons)
    for work in ("task0-n1", "task1-n2"):
        logs = list((job_dir / "spark" / "work" / work).glob("app-*/*/stderr"))
        assert any("Finished task" in p.read_text() for p in logs), f"no task finished on {work}"
    assert json.loads((tmp_path / "shards" / "synthetic_images" / "report.json").read_text())["ok"]
    assert re.search(r"Spark master spark://n1:\d+, web UI http://n1:\d+", _text(_log(job_dir, job_id)))


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    out = subprocess.run([*SUBMIT, "--nodes", "8", "--gpus-per-node", "8", "--time", "72:00:00", "--partition",
                          "gpu", "--account", "proj", "--qos", "high", "--constraint", "h100", "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    # base: the paper's 4,096 pairs per step, the accumulation derived from the 64 ranks
    assert script.splitlines()[0] == "global batch 4096 = 16 per rank x 64 ranks x 4 accumulation steps"
    job_dir = tmp_path / "outputs" / "run"  # train.output_dir of the base config
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=4320", "#SBATCH --signal=USR2@120", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                 "#SBATCH --cpus-per-task=9", f"#SBATCH --output={job_dir}/submitit/%j_0_log.out",
                 f"export PYTHONPATH={REPO}"):
        assert line in script, line
    assert re.search(rf"^srun .* -m submitit\.core\._submit {job_dir}/submitit$", script, re.M)
    assert not (tmp_path / "outputs").exists()


def test_dataprep_dry_run_prints_one_task_per_node_and_checks_the_corpus_first(tmp_path):
    args = [*SUBMIT, "--dataprep", "cc12m", "--data-root", tmp_path, "--nodes", "8", "--cpus-per-task", "32",
            "--dry-run", "threads=64"]
    out = subprocess.run(list(map(str, args)), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"dataprep cc12m on Spark: 8 node(s) x 32 cores -> {tmp_path}/shards/cc12m"
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --job-name=dataprep-cc12m", f"#SBATCH --output={tmp_path}/jobs/dataprep_cc12m/submitit/"
                 "%j_0_log.out"):
        assert line in out.stdout, line
    assert "--gpus-per-node" not in out.stdout
    bad = subprocess.run(list(map(str, [*args[:-1], "thread=64"])), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown setting 'thread'" in bad.stderr
    assert not (tmp_path / "jobs").exists()


def test_time_limits_in_slurm_formats():
    sys.path.insert(0, str(REPO))
    from slurm.submit import parse_time

    assert [parse_time(t) for t in ("72:00:00", "3-00:00:00", "1-12", "2-1:30", "90", "90:30", "0:0:30")] == \
           [4320, 4320, 2160, 2970, 90, 91, 1]
    with pytest.raises(ValueError):
        parse_time("0")
