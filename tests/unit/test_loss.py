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


@pytest.mark.parametrize("rotate", [True, False])
def test_pairs_of_tomograms_with_different_tilt_ranges_get_their_own_masks(rotate):
    """A batch mixing two tomograms' pairs: each pair's M, M_φ, input and loss are those of
    the pair built alone with its own tomogram's tilt range."""
    from deepdewedge.fit.batch import make_batch
    from deepdewedge.fit.step import FitSettings, batch_wedge, row_tilt_ranges

    g = torch.Generator().manual_seed(5)
    crops0, crops1 = (
        torch.randn(4, 14, 14, 14, generator=g),
        torch.randn(4, 14, 14, 14, generator=g),
    )
    per_tomo = torch.tensor([[-60.0, 60.0], [-42.0, 65.0]], dtype=torch.float64)
    tomo_of_row = torch.tensor([0, 1, 1, 0])
    rotmats = sample_rotations(4, generator=g) if rotate else None
    settings = FitSettings(
        subtomo_size=8, mw_angle=60.0, num_epochs=1, batch_size=4, adam_params={}, seed=0
    )
    shared = missing_wedge_mask((8, 8, 8), mw_angle_deg=60.0)
    ranges = row_tilt_ranges(per_tomo[tomo_of_row], torch.arange(4), torch.device("cpu"))
    mask, wedge = batch_wedge(settings, shared, ranges)
    assert mask.shape == (4, 8, 8, 5) and not torch.equal(mask[0], mask[1])
    options = {"subtomo_size": 8, "rotate": rotate, "generator": None, "interpolation": "linear"}
    batch = make_batch(crops0, crops1, mw_mask=mask, **wedge, rotmats=rotmats, **options)
    batch_losses = masked_fourier_loss(
        torch.zeros_like(batch.target), batch.target, loss_weights(mask, batch.rot_mw_mask)
    )
    losses = []
    for i, tomo in enumerate(tomo_of_row.tolist()):
        own = tuple(per_tomo[tomo].tolist())
        own_mask = missing_wedge_mask((8, 8, 8), tilt_range_deg=own)
        alone = make_batch(
            crops0[i : i + 1],
            crops1[i : i + 1],
            mw_mask=own_mask,
            tilt_range_deg=own,
            rotmats=None if rotmats is None else rotmats[i : i + 1],
            **options,
        )
        assert torch.equal(mask[i], own_mask)
        assert torch.equal(batch.rot_mw_mask[i], alone.rot_mw_mask[0])
        torch.testing.assert_close(batch.model_input[i], alone.model_input[0])
        torch.testing.assert_close(batch.target[i], alone.target[0])
        weights = loss_weights(own_mask, alone.rot_mw_mask)
        assert torch.equal(loss_weights(mask, batch.rot_mw_mask)[i], weights[0])
        losses.append(masked_fourier_loss(torch.zeros_like(alone.target), alone.target, weights))
    assert batch_losses.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    # Pairs without ranges of their own keep the one shared mask of the settings' wedge.
    assert batch_wedge(settings, shared, None) == (shared, {"mw_angle_deg": 60.0})
    assert batch_wedge(settings, None, ranges) == (None, {"mw_angle_deg": 60.0})
