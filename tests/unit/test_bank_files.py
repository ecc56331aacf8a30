"""Bank files: written in pieces and atomically, read a batch of rows at a time."""

import sys

import numpy as np
import pytest
import torch

from deepdewedge.fit.bank_files import BankFile, load_input_bank, new_bank, write_filled_bank
from deepdewedge.fit.distributed import DistContext
from deepdewedge.io.checkpoint import save_checkpoint
from deepdewedge.io.errors import InputError
from tests.messages import assert_one_line


def _rows(n=10, size=6, seed=0):
    return torch.randn(n, size, size, size, generator=torch.Generator().manual_seed(seed))


def _bank(path, rows):
    with new_bank(path, tuple(rows.shape)) as writer:
        writer.write(4, rows[4:])  # in pieces, in any order
        writer.write(0, rows[:4])
    return path


def test_bank_file_reads_rows_as_the_tensor_holds_them(tmp_path):
    rows = _rows()
    path = _bank(tmp_path / "b.npy", rows)
    assert np.array_equal(np.load(path), rows.numpy())  # a plain .npy file
    bank = BankFile(path)
    assert len(bank) == 10 and bank.shape == rows.shape and bank.nbytes == rows.numel() * 4
    index = torch.tensor([7, 2, 3, 4, 9, 0, 0])
    assert torch.equal(bank[index], rows[index])
    assert torch.equal(bank[2:5], rows[2:5]) and torch.equal(bank[8:20], rows[8:])
    assert bank[5:2].shape == (0, 6, 6, 6)
    view = bank.rows(3, 8)
    assert len(view) == 5 and torch.equal(view[torch.tensor([4, 0])], rows[[7, 3]])
    assert torch.equal(view[:], rows[3:8]) and torch.equal(view.to("cpu"), rows[3:8])
    with pytest.raises(IndexError):
        view[torch.tensor([5])]


def test_a_failed_write_leaves_the_old_bank(tmp_path):
    old = _rows()
    path = _bank(tmp_path / "b.npy", old)
    with pytest.raises(RuntimeError, match="stop"), new_bank(path, (3, 6, 6, 6)) as writer:
        writer.write(0, torch.zeros(3, 6, 6, 6))
        raise RuntimeError("stop")
    assert np.array_equal(np.load(path), old.numpy())
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left
    with new_bank(tmp_path / "empty.npy", (0, 6, 6, 6)):
        pass
    assert len(BankFile(tmp_path / "empty.npy")) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_a_bank_leaves_no_pages_of_it_in_the_process(tmp_path):
    def rss_mib():
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("RssFile", "RssAnon")}

    path = tmp_path / "big.npy"
    with new_bank(path, (256, 32, 32, 32)) as writer:  # 32 MiB
        for lo in range(0, 256, 32):
            writer.write(lo, _rows(32, 32, seed=lo))
    bank = BankFile(path)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    bank[order[:8]]  # libraries' pages touched once
    before = rss_mib()
    for lo in range(0, 256, 8):
        batch = bank[order[lo : lo + 8]]
    for lo in range(0, 256, 8):
        batch = bank[lo : lo + 8]
    after = rss_mib()
    assert batch.shape == (8, 32, 32, 32)
    assert after["RssFile"] - before["RssFile"] < 4 and after["RssAnon"] - before["RssAnon"] < 8


def test_filled_bank_holds_every_part_in_order(tmp_path):
    fit0 = _rows(7)
    val0 = BankFile(_bank(tmp_path / "val.npy", _rows(10, seed=1))).rows(6, 9)
    calls = []

    def fill(rows, part, where):
        calls.append((part, where.start, where.stop))
        assert len(rows) == where.stop - where.start
        return 2 * rows

    path = tmp_path / "input_bank_e00002.npy"
    parts = write_filled_bank(path, [fit0, val0], fill, DistContext(), chunk_rows=3)
    assert calls == [(0, 0, 3), (0, 3, 6), (0, 6, 7), (1, 0, 3)]
    assert torch.equal(parts[0][:], 2 * fit0) and torch.equal(parts[1][:], 2 * val0[:])
    assert np.array_equal(np.load(path), torch.cat([2 * fit0, 2 * val0[:]]).numpy())


def test_input_bank_of_a_checkpoint(tmp_path):
    rows = _rows(10)
    path = _bank(tmp_path / "input_bank_e00004.npy", rows)
    ckpt = tmp_path / "latest.ckpt"
    fit0, val0 = load_input_bank(path, n_fit=8, n_val=2, checkpoint=ckpt)
    assert torch.equal(fit0[:], rows[:8]) and torch.equal(val0[:], rows[8:])
    fit0, val0 = load_input_bank(path, n_fit=10, n_val=0, checkpoint=ckpt)
    assert len(fit0) == 10 and val0 is None
    # The .pt state of earlier versions is still read.
    legacy = save_checkpoint(tmp_path / "input_bank_e00002.pt", {"fit0": rows[:8], "val0": None})
    fit0, val0 = load_input_bank(legacy, n_fit=8, n_val=0, checkpoint=ckpt)
    assert torch.equal(fit0, rows[:8]) and val0 is None
    with pytest.raises(InputError, match="replaced by a later missing-wedge update") as err:
        load_input_bank(tmp_path / "input_bank_e00009.npy", n_fit=8, n_val=2, checkpoint=ckpt)
    assert_one_line(err, ckpt)
    with pytest.raises(InputError, match="not the 12 prepared ones") as err:
        load_input_bank(path, n_fit=9, n_val=3, checkpoint=ckpt)
    assert_one_line(err, path)


def test_a_damaged_bank_file_is_a_one_line_error(tmp_path):
    text = tmp_path / "subtomo0.npy"
    text.write_text("not a bank")
    with pytest.raises(InputError, match="unreadable sub-tomogram bank") as err:
        BankFile(text)
    assert_one_line(err, text)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3)))
    with pytest.raises(InputError, match="not float32 crops") as err:
        BankFile(wrong)
    assert_one_line(err, wrong)
    cut = tmp_path / "cut.npy"
    _bank(cut, _rows(4))
    with open(cut, "r+b") as handle:
        handle.truncate(cut.stat().st_size - 100)
    with pytest.raises(InputError, match="truncated") as err:
        BankFile(cut)[2:4]
    assert_one_line(err, cut)
