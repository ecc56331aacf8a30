import pytest
import torch

from deepdewedge.fit.wedge_update import fill_missing_wedges
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.model.unet import DeWedgeModel, UNet3D, count_parameters


def test_reference_architecture_size():
    # 64 channels, 3 down-sampling layers: the 27.3 M parameters the paper reports.
    assert count_parameters(UNet3D()) == pytest.approx(27.3e6, rel=0.005)


def test_residual_network_adds_its_input():
    torch.manual_seed(0)
    net = UNet3D(chans=4, num_downsample_layers=2, residual=True)
    x = torch.randn(1, 1, 16, 16, 16)
    plain = UNet3D(chans=4, num_downsample_layers=2, residual=False)
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x), plain(x) + x)


def test_bare_network_is_blind_to_each_inputs_mean_and_contrast():
    # Why affine_equivariant exists: the instance norms remove both.
    torch.manual_seed(0)
    net = UNet3D(chans=4, num_downsample_layers=2).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(3.0 * x), net(x), atol=1e-4, rtol=1e-4)
        assert abs(float(net(x + 5.0).mean() - net(x).mean())) < 0.05


@pytest.mark.parametrize("residual", [False, True])
def test_affine_equivariant_network_follows_each_inputs_mean_and_contrast(residual):
    torch.manual_seed(0)
    net = UNet3D(chans=4, num_downsample_layers=2, residual=residual, affine_equivariant=True)
    net.eval()
    x = torch.randn(3, 1, 16, 16, 16)
    a = torch.tensor([0.5, 2.0, 7.0]).view(-1, 1, 1, 1, 1)
    b = torch.tensor([-3.0, 0.0, 10.0]).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(a * x + b), a * net(x) + b, atol=1e-4, rtol=1e-4)
        # Each sample is standardised on its own: batch neighbours do not matter.
        torch.testing.assert_close(net(x[1:2]), net(x)[1:2], atol=1e-5, rtol=1e-5)
        # A constant input (an empty tile) comes back as it is, not divided by zero.
        assert net(torch.full((1, 1, 8, 8, 8), 4.0)).allclose(torch.tensor(4.0))


def test_affine_equivariant_residual_is_input_plus_scaled_correction():
    torch.manual_seed(0)
    net = UNet3D(chans=4, num_downsample_layers=1, residual=True, affine_equivariant=True)
    plain = UNet3D(chans=4, num_downsample_layers=1, affine_equivariant=True)
    plain.load_state_dict(net.state_dict())
    x = 2.0 + 3.0 * torch.randn(1, 1, 8, 8, 8)
    # plain(x) = mean + std·g(z), net(x) = x + std·g(z).
    with torch.no_grad():
        torch.testing.assert_close(net(x), x + plain(x) - x.mean(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_shapes_and_size_multiple(depth):
    model = DeWedgeModel(chans=4, num_downsample_layers=depth)
    assert model.size_multiple == 2**depth
    x = torch.randn(2, 1, 16, 16, 8)
    assert model(x).shape == x.shape


def test_normalisation_is_kept_in_state_dict_and_undone_on_output():
    model = DeWedgeModel(chans=4, num_downsample_layers=1)
    model.set_normalization(5.0, 3.0)
    other = DeWedgeModel(chans=4, num_downsample_layers=1)
    other.load_state_dict(model.state_dict())
    assert other.input_loc.item() == 5.0 and other.input_scale.item() == 3.0
    # Output scales with the input's units: f(a·x + b) = a·g(x) + b for matching stats.
    x = torch.randn(1, 1, 8, 8, 8)
    model.eval()
    base = DeWedgeModel(chans=4, num_downsample_layers=1).eval()
    base.load_state_dict(model.state_dict())
    base.set_normalization(0.0, 1.0)
    torch.testing.assert_close(model(3 * x + 5), 3 * base(x) + 5, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        model.set_normalization(0.0, 0.0)


class _Constant(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x, 2.0)


def test_wedge_update_replaces_only_the_wedge():
    crops = torch.randn(3, 14, 14, 14, generator=torch.Generator().manual_seed(0))
    filled = fill_missing_wedges(
        _Constant(),
        crops,
        mw_angle_deg=60,
        size_multiple=4,
        batch_size=2,
        device=torch.device("cpu"),
    )
    mask = missing_wedge_mask((14, 14, 14), mw_angle_deg=60)
    spec_in = torch.fft.rfftn(crops, dim=(-3, -2, -1))
    spec_out = torch.fft.rfftn(filled, dim=(-3, -2, -1))
    # Outside the wedge: the measured data, unchanged.
    torch.testing.assert_close(spec_out * mask, spec_in * mask, atol=1e-3, rtol=1e-4)
    # Inside the wedge: the prediction's spectrum (a constant has only the zero frequency,
    # which lies outside the wedge), so the wedge is emptied.
    assert (spec_out * (1 - mask)).abs().max() < 1e-3
    assert (spec_in * (1 - mask)).abs().max() > 1.0


def test_wedge_update_fills_each_crops_own_wedge():
    """Crops of tomograms with different tilt ranges: each keeps its own measured region and
    only its own missing wedge is replaced, as if filled alone with its own range.

    An odd edge has no Nyquist planes, where an asymmetric wedge is not point symmetric.
    """
    crops = torch.randn(3, 13, 13, 13, generator=torch.Generator().manual_seed(2))
    ranges = [(-60.0, 60.0), (-40.0, 65.0), (-60.0, 60.0)]
    options = {"size_multiple": 4, "batch_size": 2, "device": torch.device("cpu")}
    filled = fill_missing_wedges(_Constant(), crops, tilt_range_deg=torch.tensor(ranges), **options)
    spec_in = torch.fft.rfftn(crops, dim=(-3, -2, -1))
    spec_out = torch.fft.rfftn(filled, dim=(-3, -2, -1))
    wide = missing_wedge_mask((13, 13, 13), tilt_range_deg=ranges[1])
    narrow = missing_wedge_mask((13, 13, 13), tilt_range_deg=ranges[0])
    assert (wide * (1 - narrow)).sum() > 0  # measured by crop 1 only
    for i, tilts in enumerate(ranges):
        own = missing_wedge_mask((13, 13, 13), tilt_range_deg=tilts)
        torch.testing.assert_close(spec_out[i] * own, spec_in[i] * own, atol=1e-3, rtol=1e-4)
        assert (spec_out[i] * (1 - own)).abs().max() < 1e-3  # the constant's (empty) wedge
        alone = fill_missing_wedges(_Constant(), crops[i : i + 1], tilt_range_deg=tilts, **options)
        torch.testing.assert_close(filled[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # Crop 1's measured data beyond the common wedge stays; crop 0 loses that region.
    extra = wide * (1 - narrow)
    assert (spec_out[1] * extra).abs().max() > 1.0 and (spec_out[0] * extra).abs().max() < 1e-3
    with pytest.raises(ValueError, match="one tilt range per crop"):
        fill_missing_wedges(_Constant(), crops, tilt_range_deg=torch.tensor(ranges[:2]), **options)


class _Recorder(torch.nn.Module):
    """Doubles its input and keeps what it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return 2 * x + x.square()


def test_wedge_update_predicts_from_the_crop_with_its_wedge_emptied():
    crops = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = missing_wedge_mask((16, 16, 16), mw_angle_deg=60)
    model = _Recorder()
    options = {"mw_angle_deg": 60, "size_multiple": 4, "batch_size": 2}
    once = fill_missing_wedges(model, crops, device=torch.device("cpu"), **options)
    # What the network saw holds nothing in the wedge, as every fitting input.
    seen = torch.fft.rfftn(model.seen[0][:, 0], dim=(-3, -2, -1))
    assert (seen * (1 - mask)).abs().max() < 1e-3
    measured = torch.fft.rfftn(crops, dim=(-3, -2, -1)) * mask
    torch.testing.assert_close(seen * mask, measured, atol=1e-4, rtol=1e-4)
    # A second update with the same network changes nothing: no feedback of earlier fills.
    twice = fill_missing_wedges(model, once, device=torch.device("cpu"), **options)
    torch.testing.assert_close(twice, once, atol=1e-4, rtol=1e-4)
    assert float((once - crops).abs().max()) > 0.1  # the wedge was filled at all


def test_wedge_update_pads_odd_sizes_for_the_network():
    model = DeWedgeModel(chans=2, num_downsample_layers=2)
    crops = torch.randn(2, 13, 13, 13)
    assert (
        fill_missing_wedges(
            model, crops, mw_angle_deg=60, size_multiple=4, batch_size=1, device=torch.device("cpu")
        ).shape
        == crops.shape
    )


def test_model_input_statistics_standardise_the_inputs():
    from deepdewedge.fit.batch import make_batch
    from deepdewedge.fit.loop import STATS_SEED_OFFSET, Banks, FitSettings, model_input_statistics

    g = torch.Generator().manual_seed(0)
    banks = Banks(
        fit0=3 + 2 * torch.randn(6, 14, 14, 14, generator=g),
        fit1=torch.randn(6, 14, 14, 14, generator=g),
    )
    settings = FitSettings(
        subtomo_size=8, mw_angle=60, num_epochs=1, batch_size=6, adam_params={}, seed=5
    )
    mask = missing_wedge_mask((8, 8, 8), mw_angle_deg=60)
    loc, scale = model_input_statistics(banks, settings, mask)
    batch = make_batch(
        banks.fit0,
        banks.fit1,
        subtomo_size=8,
        mw_mask=mask,
        mw_angle_deg=60,
        rotate=True,
        generator=torch.Generator().manual_seed(5 + STATS_SEED_OFFSET),
    )
    z = (batch.model_input - loc) / scale
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-3)
    # The extra wedge (and interpolation) remove power from white noise of std 2.
    assert loc == pytest.approx(3.0, abs=0.15) and 1.0 < scale < 2.0


def test_denormals_are_flushed_inside_and_restored_after():
    import torch

    from deepdewedge.model.denormals import flush_denormals

    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 denormal
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    with flush_denormals():
        assert float(tiny * 1.0) == 0.0
    assert float(tiny * 1.0) != 0.0


def test_new_fits_are_affine_equivariant_and_older_checkpoints_stay_bare():
    from deepdewedge.config.fitting import UNetParams
    from deepdewedge.pipeline.fitting import build_model

    assert UNetParams().affine_equivariant
    # unet_params stored before the switch existed lack it: the network they hold is bare.
    assert not build_model({"chans": 4, "num_downsample_layers": 1}).unet.affine_equivariant
