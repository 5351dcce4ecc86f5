"""Process setup: this process's place in the job (``Dist``), joining the process group torchrun
describes, and the process-wide torch settings a training process runs with."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as tdist

from ..cpu import flush_denormals, tune_allocator


@dataclass
class Dist:
    """This process's place in the job; collectives are no-ops with one process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        if self.active:
            box = [obj]
            tdist.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` alone)."""
        if self.active:
            out = [None] * self.world_size
            tdist.all_gather_object(out, obj)
            return out
        return [obj]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...), or
    run alone. NCCL for CUDA devices, gloo for the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        dev = torch.device("cuda", local if device == "cuda" else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    backend = None
    if world > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev, backend)


def process_settings(num_threads: Optional[int], flush_denormal: bool, device: torch.device,
                     deterministic: bool = False) -> None:
    """Process-wide settings of a training process (``main`` applies them; they outlive the run):
    torch's intra-op threads, and on the CPU flushing denormal floats to zero (the AEV Gaussians
    underflow into denormals; see ``TrainConfig.flush_denormal``) and the allocator tuning of
    ``aimnet_fast.cpu``; ``deterministic`` (``TrainConfig.deterministic``): one thread unless
    ``num_threads`` is given, and torch's deterministic algorithms."""
    if deterministic and not num_threads and device.type == "cpu":
        num_threads = 1
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        if flush_denormal:
            flush_denormals()
        tune_allocator()


def die_with_parent() -> None:
    """Linux: end this process (SIGTERM) when its parent dies. Under torchrun the parent is the
    elastic agent; a killed agent must not leave its workers running on as orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:       # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def teardown(dist: Dist) -> None:
    if dist.active:
        tdist.destroy_process_group()
