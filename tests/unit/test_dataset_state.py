"""Dataset state files and shards."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepdewedge.io.errors import InputError
from deepdewedge.pipeline.dataset_state import (
    Shard,
    StateWriter,
    parse_shard,
    read_state,
    state_dir,
)


@given(
    names=st.lists(st.text("abcdefgh_0123", min_size=1, max_size=6), unique=True, max_size=40),
    count=st.integers(1, 9),
)
def test_shards_are_disjoint_cover_everything_and_balance(names, count):
    shares = [Shard(k, count).take(names) for k in range(1, count + 1)]
    flat = [name for share in shares for name in share]
    assert sorted(flat) == sorted(names)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        (None, {}, Shard(1, 1)),
        ("2/4", {}, Shard(2, 4)),
        (None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}, Shard(1, 3)),
        (
            None,
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            Shard(4, 4),
        ),
        ("1/2", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(1, 2)),
    ],
)
def test_shard_from_option_or_slurm(text, environ, expected):
    assert parse_shard(text, environ) == expected


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("0/2", {}, "--shard: shard 0 of 2 does not exist"),
        ("3/2", {}, "--shard: shard 3 of 2 does not exist"),
        ("two", {}, "--shard: 'two' is not K/N"),
        (None, {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM_ARRAY_TASK_ID"),
    ],
)
def test_bad_shards_are_one_line_errors(text, environ, message):
    with pytest.raises(InputError, match=message) as err:
        parse_shard(text, environ)
    assert "\n" not in str(err.value)


def test_state_merges_shards_latest_record_wins(tmp_path):
    whole = StateWriter(tmp_path, Shard(), "data")
    whole.set("a", status="failed", error="a: broken")
    whole.set_fit(status="done", checkpoint="m.ckpt")
    first, second = (
        StateWriter(tmp_path, Shard(1, 2), "data"),
        StateWriter(tmp_path, Shard(2, 2), "data"),
    )
    first.set("a", status="refined")
    second.set("b", status="refined")
    state = read_state(tmp_path)
    assert {n: r["status"] for n, r in state["tomograms"].items()} == {
        "a": "refined",
        "b": "refined",
    }
    assert state["fit"]["checkpoint"] == "m.ckpt"
    # A writer reopened on its file keeps its records.
    assert set(StateWriter(tmp_path, Shard(1, 2), "data").tomograms) == {"a"}
    with pytest.raises(ValueError, match="unknown status"):
        first.set("c", status="done")


def test_a_damaged_state_file_names_itself(tmp_path):
    (state_dir(tmp_path)).mkdir(parents=True)
    path = state_dir(tmp_path) / "state.json"
    path.write_text(json.dumps({"fit": None})[:5])
    with pytest.raises(InputError, match=r"state\.json: not a readable dataset state; delete it"):
        read_state(tmp_path)
