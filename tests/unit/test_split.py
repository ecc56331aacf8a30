import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepdewedge.reconstruct.split import even_odd_indices, random_fraction_indices


@given(n=st.integers(2, 80), seed=st.integers(0, 1000))
def test_even_odd_partitions_by_acquisition_position(n, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    i0, i1 = even_odd_indices(order)
    assert sorted(torch.cat([i0, i1]).tolist()) == list(range(n))
    assert set(i0.tolist()) == set(order[0::2].tolist())
    assert len(i0) - len(i1) in (0, 1)


def test_dose_symmetric_split_alternates_sides():
    # Acquired 0, +3, -3, +6, -6: each half gets both signs after the first tilt.
    angles = torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0])
    order = torch.tensor([2, 3, 1, 4, 0])
    i0, i1 = even_odd_indices(order)
    assert angles[i0].tolist() == [-6.0, -3.0, 0.0] and angles[i1].tolist() == [3.0, 6.0]


def test_random_fraction_is_seeded_and_disjoint():
    a = random_fraction_indices(41, fraction=0.3, generator=torch.Generator().manual_seed(1))
    b = random_fraction_indices(41, fraction=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and len(a[0]) == 12 and len(a[1]) == 29
    assert not set(a[0].tolist()) & set(a[1].tolist())


@pytest.mark.parametrize("order", [[0, 0, 1], [0.0, 1.0], [3]])
def test_bad_orders(order):
    with pytest.raises(ValueError):
        even_odd_indices(torch.tensor(order))


def test_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        random_fraction_indices(10, fraction=1.0)
    with pytest.raises(ValueError, match="empty"):
        random_fraction_indices(3, fraction=0.1)
