"""Device, precision and process-group setup, shared by training, sampling and the benchmarks.

* ``device="auto"`` is the GPU of this rank when CUDA is available, else the CPU.
* ``dtype="auto"`` is bfloat16 autocast on a GPU that supports it, else float32.
  Parameters and optimizer state stay float32 either way; autocast runs the
  matmuls in bf16. float16 is not offered: it needs loss scaling, and every
  GPU minipt targets has bf16.
* Under ``torchrun`` (the environment holds ``WORLD_SIZE``), the process group
  is NCCL on CUDA and gloo on the CPU, and each rank takes GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minipt.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; ``cuda`` is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but this torch build sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto``, ``float32`` or ``bfloat16``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward-pass context for ``dtype``: autocast for bf16, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


MAIN_WAIT_TIMEOUT = timedelta(days=7)  # how long the other ranks wait for rank 0's solo work


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype of the forward pass
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # A CPU (gloo) group whose collectives wait as long as rank 0's solo work takes
    # (tokenizing a large corpus can take hours); training keeps the default group
    # and its timeout, so a hung rank there still ends the run.
    main_wait_group: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def autocast(self):
        return autocast(self.device, self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, fn):
        """Run ``fn()`` on rank 0 alone and return what it returns there (None elsewhere).

        An exception it raises is raised on every rank, so that the others stop with
        the same message instead of waiting at the next collective until it times out.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # handed to every rank below
                error = exc
        if self.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.main_wait_group)
            error = box[0]
        if error is not None:
            raise error
        return result

    def gather_on_main(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others); ``[obj]`` alone."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0, group=self.main_wait_group)
        return gathered

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (1 without it), known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto", dtype: str = "auto", tf32: bool = True) -> Runtime:
    """Pick device and dtype, set TF32, and join the process group when launched by ``torchrun``.

    ``tf32`` is the command's setting of that name, applied here whatever the
    device, so that a run's matmul precision is what its config says.
    """
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    rt = Runtime(dev, resolve_dtype(dtype, dev), rank, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if rt.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if rt.distributed:
        rt.main_wait_group = dist.new_group(backend="gloo", timeout=MAIN_WAIT_TIMEOUT)
    return rt


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
