import pytest
import torch

from deepdewedge.fit.loss import loss_weights, masked_fourier_loss
from deepdewedge.fourier import missing_wedge_mask, rotated_missing_wedge_mask
from deepdewedge.rotation import sample_rotations

SHAPE = (12, 12, 12)


def _weights(b, seed=0):
    rot = sample_rotations(b, generator=torch.Generator().manual_seed(seed))
    m = missing_wedge_mask(SHAPE, mw_angle_deg=60)
    return m, rotated_missing_wedge_mask(SHAPE, rot, mw_angle_deg=60)


def test_loss_equals_full_fourier_definition():
    # Odd edge: no Nyquist plane, whose ±0.5 ambiguity makes the rotated mask differ there.
    shape = (11, 11, 11)
    g = torch.Generator().manual_seed(1)
    out, tgt = torch.randn(3, 1, *shape, generator=g), torch.randn(3, 1, *shape, generator=g)
    rot = sample_rotations(3, generator=g)
    m_full = missing_wedge_mask(shape, mw_angle_deg=60, rfft=False)
    mr_full = rotated_missing_wedge_mask(shape, rot, mw_angle_deg=60, rfft=False)
    w_full = m_full * mr_full + 2 * (1 - m_full) * mr_full
    spec = torch.fft.fftn((out - tgt)[:, 0], dim=(-3, -2, -1))
    expected = (w_full * spec.abs().square()).sum(dim=(-3, -2, -1)).mean() / 11**6
    m = missing_wedge_mask(shape, mw_angle_deg=60)
    mr = rotated_missing_wedge_mask(shape, rot, mw_angle_deg=60)
    got = masked_fourier_loss(out, tgt, loss_weights(m, mr))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 12, 12), (8, 10, 11)])
def test_all_ones_weights_give_mse_parseval(shape):
    g = torch.Generator().manual_seed(2)
    out, tgt = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    ones = torch.ones(2, *shape[:2], shape[2] // 2 + 1)
    mse = (out - tgt).square().mean()
    assert masked_fourier_loss(out, tgt, ones).item() == pytest.approx(mse.item(), rel=1e-5)
    assert masked_fourier_loss(out, tgt, None).item() == pytest.approx(mse.item(), rel=1e-6)


def test_weights_values():
    m, mr = _weights(2)
    w = loss_weights(m, mr)
    assert set(torch.unique(w).tolist()) <= {0.0, 1.0, 2.0}
    assert torch.equal(w == 0, mr == 0)
    assert torch.equal(w == 2, (mr == 1) & (m == 0))


def test_identical_inputs_zero_loss_and_gradients_flow():
    m, mr = _weights(2)
    x = torch.randn(2, 1, *SHAPE, requires_grad=True)
    loss = masked_fourier_loss(x, x.detach(), loss_weights(m, mr))
    assert loss.item() == 0.0
    y = torch.randn(2, 1, *SHAPE)
    loss = masked_fourier_loss(x, y, loss_weights(m, mr))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_error_only_in_unmeasured_target_region_costs_nothing():
    # An error confined to frequencies the target never measured (M_φ = 0) is free.
    shape = (11, 11, 11)
    rot = sample_rotations(1, generator=torch.Generator().manual_seed(3))
    m = missing_wedge_mask(shape, mw_angle_deg=60)
    mr = rotated_missing_wedge_mask(shape, rot, mw_angle_deg=60)
    mr_full = rotated_missing_wedge_mask(shape, rot, mw_angle_deg=60, rfft=False)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(4))
    err = torch.fft.ifftn(
        torch.fft.fftn(x, dim=(-3, -2, -1)) * (1 - mr_full), dim=(-3, -2, -1)
    ).real
    assert err.square().sum() > 1.0
    zero = torch.zeros_like(err)
    assert masked_fourier_loss(err, zero, loss_weights(m, mr)).item() < 1e-10
