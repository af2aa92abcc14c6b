"""How work is shared across processes: ``torch.distributed``, launched by ``torchrun``.

Everything EK-FAC fits is a *sum* over documents (covariance sums, token counts, Λ sums), so N processes each sum
their own shard of the batches and one all-reduce adds the shards up; the eigendecompositions are independent per
layer, so the ranks split the layers and broadcast the results; scoring is independent per document, so each rank
writes its own columns of the score store. With one process every helper here is a no-op, which is why the rest
of the kit never asks how many processes there are.

Launch::

    torchrun --nproc_per_node 4 -m kit fit  --model M --corpus C --out RUN
    torchrun --nproc_per_node 4 -m kit score --run RUN --queries Q.jsonl
    python -m kit fit … --nproc 4            # the same: the kit launches torchrun for you

Backend: NCCL when the compute device is a GPU, gloo on CPUs (which is how ``make test`` proves that two
processes give the factors and scores of one on a laptop). Multi-node runs use torchrun's own rendezvous flags
(``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[Dist, str]:
    """Join the torchrun job (if any) and return ``(Dist, device)``; on GPUs each rank takes ``cuda:LOCAL_RANK``."""
    if not launched():
        return Dist(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.startswith("cuda"):
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place."""
    if current().world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_int(n: int, device) -> int:
    """Sum an integer over all processes; ``device`` must be the compute device (NCCL reduces GPU tensors only)."""
    if current().world == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    if current().world > 1:
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


def owner(i: int, world: int) -> int:
    """The rank that computes the ``i``-th of a list of independent jobs (e.g. layers' eigendecompositions)."""
    return i % world


def launch(argv: List[str], nproc: int) -> int:
    """Run this command under torchrun's launcher, in this process: ``torchrun --standalone --nproc_per_node N -m
    kit -- ARGV`` (the ``--nproc`` convenience). Returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "kit"] + argv)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return 2 if 2 in codes else (codes[0] or 1)
    return 0
