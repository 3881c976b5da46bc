"""Data-parallel plumbing for training.py under torchrun: the process group, one device per process,
the average of the gradients and the loss terms over the processes, and their agreement on when to stop.

    torchrun --standalone --nproc_per_node 2 training.py --groups-per-batch 10 --images-per-group 25

torchrun gives each process RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in its environment, as
pytorch/examples' imagenet and nanoGPT read them; without them (a plain `python training.py`) the run
is one process and nothing here communicates. docs/training.md says what the processes share.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Words of the errors gloo raises when another process of the group has gone (its sockets closed).
LOST_PEER_WORDS = ("closed by peer", "reset by peer", "broken pipe", "remote worker")


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes."""

    rank: int = 0  # 0 to size - 1 over all nodes; rank 0 alone writes the run's files
    size: int = 1
    local_rank: int = 0  # on this node: which GPU the process takes
    local_size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def world_from_environment(environ: dict[str, str] | None = None) -> World:
    """The World that torchrun's variables describe; one process without them."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ:
        return World()
    size = int(environ["WORLD_SIZE"])
    return World(int(environ["RANK"]), size, int(environ.get("LOCAL_RANK", 0)),
                 int(environ.get("LOCAL_WORLD_SIZE", size)))


def process_device(device: torch.device, world: World) -> torch.device:
    """This process's device: on CUDA the GPU of its LOCAL_RANK (one GPU per process); ValueError for a
    GPU named by index when several processes would share it."""
    if device.type != "cuda" or world.size == 1:
        return device
    if device.index is not None:
        raise ValueError(f"{device}: under torchrun each process takes the GPU of its LOCAL_RANK; pass cuda or auto")
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"process {world.local_rank} of this node has no GPU ({torch.cuda.device_count()} "
                         "visible); pass --nproc_per_node at most the GPU count")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration (NCCL on GPUs, gloo on CPUs); nothing for one process."""
    if world.size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def average_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor averaged over the processes, as DistributedDataParallel's reducer averages the
    gradients: flattened into one bucket, summed by one all-reduce, divided by the process count. The
    tensors as given in one process. Callable inside a compiled graph (Dynamo traces the all-reduce)."""
    if not dist.is_initialized():
        return tensors
    bucket = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(bucket)
    bucket = bucket / dist.get_world_size()
    return [part.view_as(t) for part, t in zip(bucket.split([t.numel() for t in tensors]), tensors)]


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds in any process (one all-reduce of one number; the flag itself in one process)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def wait_for_all() -> None:
    """Wait until every process reaches this point (after rank 0's save, say); nothing in one process."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def leader_first(world: World) -> Iterator[None]:
    """Run the body in rank 0 first and in the others after it: rank 0 alone decodes a folder data set
    into the cache, which the others then read."""
    if not world.leader:
        wait_for_all()
    yield
    if world.leader:
        wait_for_all()


def lost_peer(error: BaseException) -> bool:
    """Whether `error` says another process of the run has gone (killed, or ended by its own error)."""
    return dist.is_initialized() and (isinstance(error, dist.DistError)
                                      or any(words in str(error).lower() for words in LOST_PEER_WORDS))
