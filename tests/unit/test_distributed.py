"""Multi-process fitting (DDP over gloo on the CPU) matches the single-process fit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from deepdewedge import fit_model, prepare_data
from deepdewedge.config import step_config
from deepdewedge.fit.distributed import DistContext, backend_for, local_device
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.io.mrc import InputError
from deepdewedge.model.unet import DeWedgeModel

EPOCHS = 4
FIT = {
    "unet_params_dict": {"chans": 4, "num_downsample_layers": 1},
    "adam_params_dict": {"lr": 1e-3},
    "num_epochs": EPOCHS,
    # 19 fitting sub-tomograms: six batches of 3, then 1; the shares of two processes are
    # uneven (2 + 1) and, for the last batch, empty on rank 1.
    "batch_size": 3,
    "update_subtomo_missing_wedges_every_n_epochs": 2,
    "check_val_every_n_epochs": 1,
    "interpolation": "linear",
    "seed": 5,
    "precision": "32",  # spawned processes see no test fixtures: float32 on every CPU
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 10])
def test_shards_are_contiguous_and_cover_everything(world, n):
    bounds = [DistContext(rank=r, world_size=world).shard_bounds(n) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_context_is_a_no_op():
    context = DistContext()
    x = torch.arange(6.0).reshape(3, 2)
    assert context.is_main and context.shard(3) == slice(0, 3)
    assert context.all_reduce_sum(x) is x and context.gather_rows_to_main(x, [3], (2,))[0] is x
    context.barrier()


def test_backend_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert backend_for(cpu, None) == "gloo" and backend_for(gpu, "ddp") == "nccl"
    assert backend_for(gpu, "gloo") == "gloo"
    with pytest.raises(InputError, match="nccl needs GPUs"):
        backend_for(cpu, "nccl")


def test_distributed_backend_option_is_validated():
    assert step_config("fit_model", overrides={"distributed_backend": "DDP"}).distributed_backend
    with pytest.raises(InputError, match="unknown distributed_backend 'mpi4'"):
        step_config("fit_model", overrides={"distributed_backend": "mpi4"})


def test_processes_without_gpu_option_fit_on_the_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device(None) == local_device([-1]) == local_device(-1) == torch.device("cpu")
    if torch.cuda.device_count() < 2:
        with pytest.raises(InputError, match="one process per GPU"):
            local_device(0)


def _tomograms(root):
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((16, 48, 40)).astype(np.float32)
    paths = []
    for i in (0, 1):
        path = root / f"t{i}.mrc"
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(signal + rng.standard_normal(signal.shape).astype(np.float32))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    t0, t1 = _tomograms(root)
    config = step_config(
        "prepare_data",
        overrides={
            "project_dir": root / "proj",
            "tomo0_files": [t0],
            "tomo1_files": [t1],
            "subtomo_size": 16,
            "val_fraction": 0.1,
            "subtomo_extraction_strides": [8, 8, 6],
        },
    )
    result = prepare_data(config)
    assert (result["n_fitting"], result["n_val"]) == (19, 2)
    return root / "proj"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank, world, port, overrides, out):
    """One process of a fit, set up as torchrun would; writes its history to `out`."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    result = fit_model(step_config("fit_model", overrides=overrides))
    assert not torch.distributed.is_initialized()  # the group is torn down
    with open(f"{out}.{rank}.json", "w") as handle:
        json.dump({"history": result["history"], "main": result["is_main_process"]}, handle)


def _fit_in_processes(world, overrides, out):
    results = [Path(f"{out}.{r}.json") for r in range(world)]
    try:
        mp.spawn(_rank, args=(world, _free_port(), overrides, out), nprocs=world, join=True)
    except mp.ProcessExitedException as err:
        # gloo's threads can abort a process as its interpreter exits ("terminate called
        # without an active exception"); a rank writes its result only after the fit and
        # the teardown of the group, so with every result written the work is complete.
        if err.signal_name != "SIGABRT" or not all(path.exists() for path in results):
            raise
    return [json.loads(path.read_text()) for path in results]


def _params(logdir):
    state = load_checkpoint(logdir / "checkpoints/latest.ckpt")
    return state["model_state"], state


def _network(params):
    model = DeWedgeModel(**FIT["unet_params_dict"])
    model.load_state_dict(params)
    return model.eval()


def _biases_before_instance_norm(params):
    """Biases that the following instance norm removes: they do not change the output.

    Their gradient is zero up to rounding, which Adam's normalisation turns into updates of
    arbitrary sign, so their values differ between any two summation orders.
    """
    inert = set()
    for name, module in _network(params).named_modules():
        children = list(module.children()) if isinstance(module, nn.Sequential) else []
        for i, (conv, norm) in enumerate(zip(children[:-1], children[1:], strict=True)):
            if isinstance(conv, nn.Conv3d) and isinstance(norm, nn.InstanceNorm3d):
                inert.add(f"{name}.{i}.bias")
    return inert


def _relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# The bare U-Net follows the same arithmetic to rounding. The affine-equivariant one drifts
# from rounding differences faster, micro-batches alone included (2e-6 of the loss after one
# epoch, 5e-5 after four; the weights by up to 1%), so this comparison uses the bare one.
def test_two_processes_match_one_and_resume(project, tmp_path):
    """A 2-process fit in micro-batches (stopped after 2 epochs and resumed) follows the
    1-process fit of whole batches."""
    torch.set_num_threads(1)
    single_logs, ddp_logs = tmp_path / "single", tmp_path / "ddp"
    unet = {**FIT["unet_params_dict"], "affine_equivariant": False}
    fit = {**FIT, "unet_params_dict": unet, "project_dir": project}
    single = fit_model(step_config("fit_model", overrides={**fit, "logdir": single_logs}))
    # One sub-tomogram per pass: gradients accumulate, all-reduced once per step.
    ddp = {**fit, "logdir": ddp_logs, "micro_batch_size": 1}
    first = _fit_in_processes(2, {**ddp, "num_epochs": 2}, tmp_path / "first")
    assert [r["main"] for r in first] == [True, False]
    assert first[0]["history"] == first[1]["history"]  # every process agrees on the losses
    resumed = _fit_in_processes(2, {**ddp, "resume": True}, tmp_path / "resumed")
    assert resumed[0]["history"] == resumed[1]["history"]

    expected, got = single["history"], resumed[0]["history"]
    assert len(got) == EPOCHS and all(r["val_loss"] is not None for r in got)
    for key in ("fitting_loss", "val_loss"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], rel=1e-5)
    theirs, state = _params(ddp_logs)
    ours, _ = _params(single_logs)
    inert = _biases_before_instance_norm(ours)
    for name, value in ours.items():
        if name not in inert:
            assert _relative_error(theirs[name], value) < 1e-4, name
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_theirs, out_ours = (_network(params)(x) for params in (theirs, ours))
    assert _relative_error(out_theirs, out_ours) < 1e-5
    # Rank 0 alone wrote the logs: one CSV, one input-bank state (updated at epoch 2).
    assert len((ddp_logs / "losses.csv").read_text().splitlines()) == EPOCHS + 1
    assert state["bank_file"] == "input_bank_e00002.npy"
    assert [p.name for p in (ddp_logs / "checkpoints").glob("input_bank_*")] == [
        "input_bank_e00002.npy"
    ]
    bank = torch.from_numpy(np.load(ddp_logs / "checkpoints/input_bank_e00002.npy"))
    reference = torch.from_numpy(np.load(single_logs / "checkpoints/input_bank_e00002.npy"))
    assert bank.shape == (19 + 2, 28, 28, 28)  # the fitting rows, then the validation rows
    assert _relative_error(bank, reference) < 1e-4


@pytest.mark.slow
def test_torchrun_fit_model_command(project, tmp_path):
    """``torchrun --nproc_per_node 2 -m deepdewedge.cli fit-model`` runs end to end."""
    logs = tmp_path / "logs"
    args = [
        "fit-model",
        "--project-dir",
        project,
        "--unet-params-dict",
        json.dumps(FIT["unet_params_dict"]),
        "--num-epochs",
        2,
        "--batch-size",
        4,
        "--update-subtomo-missing-wedges-every-n-epochs",
        1,
        "--check-val-every-n-epochs",
        1,
        "--interpolation",
        "linear",
    ]
    config = tmp_path / "config.yaml"
    config.write_text(f"fit_model:\n  logdir: {logs}\n  distributed_backend: ddp\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "deepdewedge.cli",
        *map(str, args),
        "--config",
        str(config),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (logs / "losses.csv").read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split(",")) == 3 for line in lines)
    state = load_checkpoint(logs / "checkpoints/latest.ckpt")
    assert state["epoch"] == 1 and state["bank_file"] == "input_bank_e00001.npy"
