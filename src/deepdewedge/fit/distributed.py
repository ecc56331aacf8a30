"""Several fitting processes through ``torch.distributed`` (DDP, launched by ``torchrun``).

Launch one process per GPU with ``torchrun``; every process reads the same config::

    torchrun --nproc_per_node 4 -m deepdewedge.cli fit-model --config config.yaml

On a SLURM cluster, start one ``torchrun`` per node, e.g. in a batch script for two nodes
of four GPUs each::

    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc_per_node 4 \
        --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:29500" \
        -m deepdewedge.cli fit-model --config config.yaml

``ddw`` is the same program: ``torchrun --nproc_per_node 4 $(which ddw) fit-model ...``
works too.

Process ``LOCAL_RANK`` of a node fits on the GPU of that index among the visible ones
(``CUDA_VISIBLE_DEVICES`` restricts them), or on the CPU when the config names no GPU.

Notes
-----
The processes split each *global* batch of ``batch_size`` sub-tomograms into contiguous
slices, one per process. All of them draw the same permutation and the same rotations for the
whole global batch from the shared seeded generator, so their random streams stay identical to
each other and to a single-process run; each one's loss is scaled so that the gradient DDP
averages is the gradient of the mean loss over the global batch. A fit on several processes
therefore follows the single-process fit with the same seed, up to floating-point rounding.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from deepdewedge.config import DISTRIBUTED_BACKENDS
from deepdewedge.io.errors import InputError

log = logging.getLogger(__name__)


def backend_for(device: torch.device, option: str | None) -> str:
    """The process-group backend: `option` if it names one, else nccl on CUDA, gloo on CPU.

    `option` is the config's validated ``distributed_backend``; published strategy names such
    as ``ddp`` choose by device.
    """
    if option in DISTRIBUTED_BACKENDS:
        if option == "nccl" and device.type != "cuda":
            raise InputError(
                "distributed_backend nccl needs GPUs; name them with gpu, or use gloo on the CPU"
            )
        return option
    return "nccl" if device.type == "cuda" else "gloo"


def launched() -> bool:
    """Whether this process is one of several: started by ``torchrun`` or already grouped."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """Index of this process among those of its node (``LOCAL_RANK``, set by ``torchrun``)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def local_device(gpu: int | list[int] | None) -> torch.device:
    """The device of this process in a multi-process fit.

    Parameters
    ----------
    gpu
        The config's ``gpu``: None (or a negative first index) fits on the CPU. Otherwise the
        process takes GPU ``gpu[LOCAL_RANK]`` when `gpu` lists one GPU per local process,
        else GPU ``LOCAL_RANK`` among the visible ones.
    """
    first = (gpu or [None])[0] if isinstance(gpu, list) else gpu
    if first is None or first < 0:
        return torch.device("cpu")
    rank = local_rank()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    index = gpu[rank] if isinstance(gpu, list) and len(gpu) == per_node else rank
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise InputError(
            f"process {rank} of this node needs GPU {index} but {torch.cuda.device_count()} "
            "CUDA device(s) are visible; start at most one process per GPU (torchrun "
            "--nproc_per_node), or drop the gpu option to fit on the CPU"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DistContext:
    """Rank and size of the process group, with the few collectives the fitting loop needs.

    The single-process context (the default) makes every collective a no-op, so the loop has
    one code path.

    Attributes
    ----------
    rank
        Index of this process, 0 to ``world_size - 1``; rank 0 writes every file.
    world_size
        Number of processes.
    comm_device
        Device the backend communicates from: the GPU for nccl, the CPU for gloo.
    """

    rank: int = 0
    world_size: int = 1
    comm_device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, logs and reports progress."""
        return self.rank == 0

    def shard_bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """`[start, stop)` of the contiguous share of `n` items of `rank` (default: this one).

        The first ``n % world_size`` ranks take one item more than the others; with fewer items
        than ranks, the last ranks get none.
        """
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def shard(self, n: int) -> slice:
        """The contiguous share of `n` items of this process, as a slice."""
        return slice(*self.shard_bounds(n))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over the processes (a new tensor on the device of `tensor`).

        Every process receives the same values, so decisions taken on them agree.
        """
        if self.world_size == 1:
            return tensor
        buffer = tensor.to(self.comm_device, copy=True)
        torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
        return buffer.to(tensor.device)

    def gather_rows_to_main(
        self, local: torch.Tensor | None, counts: list[int], row_shape: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """The rows of every process, in rank order, on rank 0 (in host memory).

        Parameters
        ----------
        local
            `(counts[rank], ...)` this process's rows; None when it has none.
        counts
            Number of rows of each process, known to all of them.
        row_shape
            Shape of one row.

        Returns
        -------
        list of torch.Tensor
            On rank 0, one `(counts[r], ...)` float32 tensor per process; elsewhere an empty
            list. A single process gets back its own rows.
        """
        if self.world_size == 1:
            return [local if local is not None else torch.empty((0, *row_shape))]
        piece = torch.zeros((max(counts), *row_shape), device=self.comm_device)
        if local is not None:
            piece[: len(local)] = local.to(self.comm_device)
        gathered = [torch.empty_like(piece) for _ in range(self.world_size)]
        torch_dist.all_gather(gathered, piece)
        if not self.is_main:
            return []
        return [rows[:n].cpu() for rows, n in zip(gathered, counts, strict=True)]

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            torch_dist.barrier()


@contextmanager
def process_group(device: torch.device, *, backend: str | None = None) -> Iterator[DistContext]:
    """Join the process group ``torchrun`` describes; leave it on exit, errors included.

    Parameters
    ----------
    device
        This process's device (from :func:`local_device`); on CUDA it becomes the current
        device before the group starts.
    backend
        The config's ``distributed_backend`` (see :func:`backend_for`).

    Yields
    ------
    DistContext
        Rank and size of the group. A group started beforehand by the caller is used as it
        is and left running.
    """
    if not torch_dist.is_available():
        raise InputError(
            "this PyTorch build has no torch.distributed; fit with one process (plain ddw)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = not torch_dist.is_initialized()
    if owned:
        name = backend_for(device, backend)
        kwargs = {}
        if (
            name == "nccl"
            and "device_id" in inspect.signature(torch_dist.init_process_group).parameters
        ):
            kwargs["device_id"] = device  # binds the communicator to this GPU at once
        torch_dist.init_process_group(backend=name, init_method="env://", **kwargs)
    try:
        name = torch_dist.get_backend()
        comm = device if name == "nccl" else torch.device("cpu")
        context = DistContext(
            rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), comm_device=comm
        )
        if context.is_main:
            log.info("fitting in %d processes (%s backend)", context.world_size, name)
        yield context
    finally:
        if owned and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
