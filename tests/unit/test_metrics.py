import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.evaluate.metrics import correlation_coefficient


@pytest.fixture(scope="module")
def volume():
    return torch.randn((32, 32, 32), generator=torch.Generator().manual_seed(0))


def test_self_correlation_is_one(volume):
    assert correlation_coefficient(volume, volume) == pytest.approx(1.0, abs=1e-12)


def test_negative_correlation_is_minus_one(volume):
    assert correlation_coefficient(volume, -volume) == pytest.approx(-1.0, abs=1e-12)


def test_independent_noise_is_uncorrelated(volume):
    other = torch.randn((32, 32, 32), generator=torch.Generator().manual_seed(1))
    assert abs(correlation_coefficient(volume, other)) < 0.05


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=1e-3, max_value=1e3),
    offset=st.floats(min_value=-1e3, max_value=1e3),
)
def test_invariant_to_affine_rescaling(scale, offset):
    # float64 inputs, so that the rescaling itself loses no precision.
    a = torch.randn((8, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn((8, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = a + 0.5 * noise
    reference = correlation_coefficient(a, b)
    assert correlation_coefficient(scale * a + offset, b) == pytest.approx(reference, abs=1e-9)
    assert correlation_coefficient(a, scale * b + offset) == pytest.approx(reference, abs=1e-9)


def test_matches_numpy_and_accepts_mixed_inputs():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6))
    b = a + rng.normal(size=(4, 5, 6))
    expected = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert correlation_coefficient(a, b) == pytest.approx(expected, abs=1e-12)
    assert correlation_coefficient(torch.from_numpy(a).float(), b) == pytest.approx(
        expected, abs=1e-6
    )
    assert isinstance(correlation_coefficient(a, b), float)


def test_is_computed_in_float64():
    # A large offset destroys float32 precision of the mean-free signal, not float64's.
    base = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    shifted = base + 1e6
    assert correlation_coefficient(shifted, base) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.zeros(3, 3), torch.zeros(3, 4), "shape"),
        (torch.ones(3, 3), torch.rand(3, 3), "constant"),
        (torch.zeros(0), torch.zeros(0), "empty"),
        ([1.0, 2.0], [1.0, 3.0], "numpy array or a torch tensor"),
    ],
)
def test_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        correlation_coefficient(a, b)
