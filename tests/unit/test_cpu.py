"""CPU settings of a fit: thread count, bf16 detection and the cache-sized micro-batch."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepdewedge import cpu
from deepdewedge.pipeline.common import resolve_precision


@pytest.fixture
def no_limits(monkeypatch, tmp_path):
    """No SLURM allocation, no cgroup quota, no OMP_NUM_THREADS; threads restored after."""
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu, "_CGROUP_CPU_MAX", tmp_path / "absent")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _affinity():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_available_cpus_is_the_affinity_without_limits(no_limits):
    assert cpu.available_cpus() == _affinity()


def test_slurm_allocation_and_cgroup_quota_lower_the_count(no_limits, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu.available_cpus() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu, "_CGROUP_CPU_MAX", quota)
    quota.write_text("50000 100000\n")  # half a CPU: still one thread
    assert cpu.available_cpus() == 1
    quota.write_text("max 100000\n")  # no quota
    assert cpu.available_cpus() == _affinity()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "10000")  # more than granted: ignored
    assert cpu.available_cpus() == _affinity()


def test_set_cpu_threads_follows_the_allocation(no_limits, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu.set_cpu_threads() == 1 == torch.get_num_threads()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    # Shared among the processes of one node, at least one each.
    assert cpu.set_cpu_threads(local_processes=1000) == 1 == torch.get_num_threads()
    assert cpu.set_cpu_threads() == _affinity() == torch.get_num_threads()


def test_omp_num_threads_is_left_to_the_user(no_limits, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert cpu.set_cpu_threads() == 1 == torch.get_num_threads()


def test_cache_size_is_read_from_sysfs(monkeypatch, tmp_path):
    for index, size in (("index0", "32K"), ("index2", "1024K"), ("index3", "16384K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    monkeypatch.setattr(cpu, "_CACHE_DIR", tmp_path)
    assert cpu.last_level_cache_bytes() == 16 * 2**20
    monkeypatch.setattr(cpu, "_CACHE_DIR", tmp_path / "absent")
    assert cpu.last_level_cache_bytes() == cpu.DEFAULT_CACHE_BYTES


def test_micro_batch_of_the_measured_settings(monkeypatch):
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert cpu.cpu_micro_batch(16, 32, "32") == 16  # 2 MiB a sample: a batch of 8 at once
    assert cpu.cpu_micro_batch(16, 48, "32") == 4
    assert cpu.cpu_micro_batch(16, 48, "bf16-mixed") == 9
    assert cpu.cpu_micro_batch(32, 64, "32") == 1
    assert cpu.cpu_micro_batch(64, 96, "32") == 1  # never zero


@given(
    chans=st.integers(1, 128),
    size=st.integers(4, 160),
    precision=st.sampled_from(["32", "bf16-mixed"]),
    cache=st.integers(2**16, 2**30),
)
def test_micro_batch_fits_the_cache_or_is_one(chans, size, precision, cache):
    original = cpu.last_level_cache_bytes
    cpu.last_level_cache_bytes = lambda: cache
    try:
        micro = cpu.cpu_micro_batch(chans, size, precision)
    finally:
        cpu.last_level_cache_bytes = original
    per_sample = chans * size**3 * (2 if precision == "bf16-mixed" else 4)
    assert micro >= 1
    assert micro == 1 or micro * per_sample <= cache < (micro + 1) * per_sample


def test_auto_precision_on_the_cpu_follows_native_bf16(monkeypatch):
    device = torch.device("cpu")
    monkeypatch.setattr("deepdewedge.pipeline.common.has_native_bf16", lambda: True)
    assert resolve_precision("auto", device) == "bf16-mixed"
    assert resolve_precision("32", device) == "32"
    monkeypatch.setattr("deepdewedge.pipeline.common.has_native_bf16", lambda: False)
    assert resolve_precision("auto", device) == "32"
    assert resolve_precision("bf16-mixed", device) == "bf16-mixed"
