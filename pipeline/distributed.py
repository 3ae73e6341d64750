"""The one place that decides rank, world size and local rank, and gathers tensors across ranks.

Launchers export different variables: torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK;
srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; a Submitit task (SLURM or local) reads them
through `from_submitit()` and exports them. Everything else in the project asks this module.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_node(nodelist: str) -> str:
    """`n[1-3,7],m2` -> `n1` (the first host of a SLURM node list, without scontrol)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head


def _port_for(job_id: str) -> int:
    """The rendezvous port every task of a job derives alike (29500..49499), requeues included."""
    n = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 29500 + n % 20000


def detect(env=None) -> DistEnv:
    """Rank/world/local rank and rendezvous address from whichever launcher started us."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR") or (_first_node(env["SLURM_JOB_NODELIST"])
                                      if "SLURM_JOB_NODELIST" in env else "127.0.0.1")
    port = int(env.get("MASTER_PORT") or _port_for(env.get("SLURM_JOB_ID", "0")))
    return DistEnv(rank, world, local, addr, port)


def from_submitit(job=None) -> DistEnv:
    """Rank/world/master inside a Submitit task, from its `JobEnvironment` (SLURM, local or debug).

    The master is the job's first node; a one-node job rendezvous on loopback (the local executor's
    host name need not resolve).
    """
    if job is None:
        import submitit

        job = submitit.JobEnvironment()
    addr = job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1"
    return DistEnv(job.global_rank, job.num_tasks, job.local_rank, addr, _port_for(job.job_id))


def export_env(d: DistEnv) -> None:
    """Write the torchrun-style variables that DeepSpeed and torch.distributed read."""
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all_reduce; the flag itself without
    a process group)."""
    return bool(max_over_ranks(int(bool(flag))))


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' `value` (every rank gets it; the value itself without a process group)."""
    if not is_initialized():
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice.

    Each rank's loss uses the full gathered tensor, so the gradient of the sum of the ranks' losses
    with respect to this rank's slice is the sum over ranks; an all_reduce gives it (gloo has no
    reduce_scatter, so this works on CPU and GPU alike).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks along dim 0; gradients flow back to each rank's own slice."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
