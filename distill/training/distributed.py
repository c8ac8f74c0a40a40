"""Process-group set-up: one process, or ranks started by the deepspeed launcher / torchrun."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from distill.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    sequence_parallel_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's place among the data-parallel groups: the ranks of a sequence-parallel group share it."""
        return self.rank // self.sequence_parallel_size

    @property
    def data_world_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    def sequence_mesh(self, device_type: str):
        """The device mesh of sequence parallelism as diffusers' context parallelism names its dimensions: data
        parallel groups of consecutive ranks, each split by Ulysses (no ring)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.data_world_size, 1, self.sequence_parallel_size),
                                mesh_dim_names=("data", "ring", "ulysses"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str, sequence_parallel_size: int = 1) -> DistInfo:
    """Join (or, alone, create) the process group: gloo on CPU, NCCL on GPU.

    The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) is read here, at the
    entry, and nowhere deeper. A lone process gets a one-rank group on a free local port.
    """
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)
        if device_type == "cpu":
            _unlink_shm_buffer()
            share_cores()
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                    sequence_parallel_size)
    if info.world_size % sequence_parallel_size:
        raise ConfigError(f"parallel.sequence_parallel_size: {sequence_parallel_size} does not divide the "
                          f"{info.world_size} ranks of this run")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def share_cores() -> None:
    """CPU ranks on one machine split its cores: torch gives every process all of them, and N ranks of N threads
    on N cores thrash. As torchrun does (OMP_NUM_THREADS=1 there), unless OMP_NUM_THREADS says otherwise."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun, deepspeed
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def shutdown_distributed() -> None:
    """Leave the process group at the end of a finished run, every rank together, in a process that ends with it
    (a launched entry point): a group left for the interpreter's exit to tear down can abort a process whose run had
    finished ("terminate called without an active exception", exit status 250 under the launcher, seen with gloo on
    two ranks). Not for a process that trains again: DeepSpeed keeps the destroyed group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shm_buffer_path(rank: int) -> Path:
    """The file DeepSpeed's CPU shared-memory all-reduce maps for `rank` (csrc/cpu/comm/shm.cpp names it so)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer() -> None:
    """DeepSpeed never unlinks its shared-memory all-reduce buffers (66 MB per rank, made whenever all ranks
    are local, one rank under the launcher included): every run would leave them in /dev/shm, in RAM, until
    the machine runs out of memory. Once every rank has mapped every buffer (initialisation waits for that;
    the barrier makes sure all ranks are past it) the names can go: the mappings stay."""
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over ranks (every rank must pass the same keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _flag_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ranks_where(flag: bool) -> list[int]:
    """The ranks where `flag` is true; every rank learns the same list (one small all-reduce).

    A check that fails on one rank must stop every rank, or the others wait in their next collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), device=_flag_device())
    flags[dist.get_rank()] = float(flag)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def all_gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
