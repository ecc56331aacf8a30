"""How fitting and refinement use a CPU: threads, native bf16 and cache-sized micro-batches."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Last-level cache assumed when the system does not report one.
DEFAULT_CACHE_BYTES = 32 * 2**20
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus() -> int:
    """CPUs this process may use.

    The least of its affinity mask, SLURM's ``--cpus-per-task`` and a cgroup CPU quota (as in
    containers), each where it exists.
    """
    if hasattr(os, "sched_getaffinity"):
        counts = [len(os.sched_getaffinity(0))]
    else:
        counts = [os.cpu_count() or 1]
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    quota = _cgroup_quota()
    if quota is not None:
        counts.append(quota)
    return max(1, min(counts))


def _cgroup_quota() -> int | None:
    """CPUs granted by a cgroup-v2 quota (``cpu.max``: quota and period in µs), if any."""
    try:
        fields = _CGROUP_CPU_MAX.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
        return None  # "max": no quota
    return max(1, math.ceil(int(fields[0]) / int(fields[1])))


def set_cpu_threads(local_processes: int = 1) -> int:
    """Give PyTorch one thread per available CPU (shared among `local_processes`).

    PyTorch counts the machine's cores, which oversubscribes a SLURM job or a container that
    was granted fewer. ``OMP_NUM_THREADS``, when set, is the user's choice and is left alone.
    Returns the number of intra-op threads in use.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, available_cpus() // max(1, local_processes))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX).

    oneDNN also runs bf16 without them, by emulation, which is slower than float32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache that Linux reports, else ``DEFAULT_CACHE_BYTES``."""
    sizes = []
    for index in _CACHE_DIR.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def cpu_micro_batch(chans: int, subtomo_size: int, precision: str) -> int:
    """Samples per forward and backward pass of a CPU fit.

    The U-Net's first level holds `chans` feature maps of ``subtomo_size³`` values per
    sample. While those of a micro-batch fit in the last-level cache, oneDNN's convolutions
    and layout reorders run from cache; beyond it they stream from memory (measured on 2
    cores: 48³ sub-tomograms with 16 channels fit 1.5× faster in micro-batches of 2 than in
    one batch of 8; see docs/performance.md). At least one sample.
    """
    bytes_per_value = 2 if precision == "bf16-mixed" else 4
    per_sample = chans * subtomo_size**3 * bytes_per_value
    return max(1, last_level_cache_bytes() // per_sample)
