"""Automatic sample masks: where in a tomogram the specimen is, and where only empty ice.

The mask follows IsoNet's ``make_mask``: a voxel belongs to the sample when its neighbourhood
is unusually dense (the local mean departs from the background) or unusually structured (the
local standard deviation is high), each criterion keeping a chosen percentage of the voxels.
Two additions suit DeepDeWedge's tomograms: the density criterion works for either contrast
polarity, and the empty ice above and below the specimen is found from the z profile of the
local standard deviation (``auto_z``) instead of only by a fixed ``z_crop``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["local_mean_std", "sample_mask"]

# The Gaussian kernel is cut off at this many standard deviations.
_TRUNCATE_SIGMAS = 4.0
# Upper bound on the number of elements of one chunk filtered at a time.
_CHUNK_ELEMENTS = 2**22
# Percentiles are taken from at most this many voxels (an evenly strided subset).
_MAX_QUANTILE_SAMPLES = 2**22
# auto_z keeps every slice when the z profile of the local standard deviation varies by less
# than this fraction of its peak: no empty region stands out from the sample.
_AUTO_Z_MIN_CONTRAST = 0.2
_POLARITIES = ("both", "dark", "bright")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_volume(volume, *, ndim: int | None) -> None:
    if not isinstance(volume, torch.Tensor):
        raise ValueError(f"volume must be a torch.Tensor, got {type(volume).__name__}")
    if volume.is_complex() or volume.dtype == torch.bool:
        raise ValueError(f"volume must be real-valued, got dtype {volume.dtype}")
    if ndim is None and volume.ndim < 3:
        raise ValueError(f"volume must have shape (..., d, h, w), got {tuple(volume.shape)}")
    if ndim is not None and volume.ndim != ndim:
        raise ValueError(f"volume must have shape (d, h, w), got {tuple(volume.shape)}")
    if volume.numel() == 0:
        raise ValueError(f"volume must not be empty, got shape {tuple(volume.shape)}")


def _check_sigma(sigma_px) -> float:
    if not _is_real(sigma_px) or not math.isfinite(sigma_px) or sigma_px <= 0:
        raise ValueError(f"sigma_px must be a finite positive number, got {sigma_px!r}")
    return float(sigma_px)


def _work_dtype(volume: torch.Tensor) -> torch.dtype:
    return torch.float64 if volume.dtype == torch.float64 else torch.float32


def _gaussian_kernel(sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian, shape `(2 r + 1,)` with ``r = ceil(4 sigma_px)``."""
    radius = max(1, math.ceil(_TRUNCATE_SIGMAS * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return (kernel / kernel.sum()).to(device=device, dtype=dtype)


def _reflect_indices(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices that pad an axis of length ``n`` by ``radius`` on each side, mirrored.

    Mirroring excludes the edge sample (``2 1 | 0 1 2 ... | n-2 n-3``, as ``mode="reflect"`` in
    torch and ``mode="mirror"`` in scipy) and repeats for pads longer than the axis.
    """
    if n == 1:
        return torch.zeros(n + 2 * radius, dtype=torch.long, device=device)
    period = 2 * (n - 1)
    index = torch.arange(-radius, n + radius, device=device).remainder(period)
    return torch.where(index >= n, period - index, index)


def _filter_axis(
    src: torch.Tensor,
    dst: torch.Tensor,
    kernel: torch.Tensor,
    axis: int,
    *,
    offset: float | None = None,
) -> None:
    """Convolve `(d, h, w)` ``src`` along ``axis`` into ``dst``, chunk by chunk.

    With ``offset`` given, ``(src - offset) ** 2`` is filtered instead of ``src``.
    """
    radius = (kernel.numel() - 1) // 2
    length = src.shape[axis]
    index = None if radius < length else _reflect_indices(length, radius, src.device)
    weight = kernel.view(1, 1, -1)
    chunk_dim = 1 if axis == 0 else 0
    per_slice = src.numel() // src.shape[chunk_dim]
    step = max(1, _CHUNK_ELEMENTS // per_slice)
    for start in range(0, src.shape[chunk_dim], step):
        where = [slice(None)] * 3
        where[chunk_dim] = slice(start, start + step)
        block = src[tuple(where)].to(kernel.dtype).movedim(axis, -1)
        if offset is not None:
            block = (block - offset) ** 2
        shape = block.shape
        rows = block.reshape(-1, 1, length)
        if index is None:
            rows = F.pad(rows, (radius, radius), mode="reflect")
        else:
            rows = rows.index_select(-1, index)
        dst[tuple(where)] = F.conv1d(rows, weight).reshape(shape).movedim(-1, axis)


def _gaussian_filter(
    volume: torch.Tensor, kernel: torch.Tensor, *, offset: float | None = None
) -> torch.Tensor:
    """Separable Gaussian filter of a `(d, h, w)` volume (of ``(volume - offset) ** 2``)."""
    first = torch.empty(volume.shape, dtype=kernel.dtype, device=volume.device)
    second = torch.empty_like(first)
    _filter_axis(volume, first, kernel, 2, offset=offset)
    _filter_axis(first, second, kernel, 1)
    _filter_axis(second, first, kernel, 0)
    return first


def _local_mean_std_3d(
    volume: torch.Tensor, kernel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mean = _gaussian_filter(volume, kernel)
    # Centring on the global mean keeps E[x²] - E[x]² from cancelling catastrophically.
    offset = float(volume.mean(dtype=kernel.dtype))
    variance = _gaussian_filter(volume, kernel, offset=offset)
    step = max(1, _CHUNK_ELEMENTS // (volume.shape[1] * volume.shape[2]))
    for start in range(0, volume.shape[0], step):
        variance[start : start + step] -= (mean[start : start + step] - offset) ** 2
    return mean, variance.clamp_(min=0.0).sqrt_()


def local_mean_std(volume: torch.Tensor, *, sigma_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-weighted local mean and standard deviation of a volume.

    Parameters
    ----------
    volume : torch.Tensor
        Volume(s), shape `(..., d, h, w)`, real-valued, on any device.
    sigma_px : float
        Standard deviation of the Gaussian window in voxels (the same along every axis); the
        window is cut off at ``4 sigma_px``.

    Returns
    -------
    mean : torch.Tensor
        ``G * v``, the volume filtered with the normalised Gaussian ``G``, shape
        `(..., d, h, w)`.
    std : torch.Tensor
        ``sqrt(G * v² - (G * v)²)``, the standard deviation of the voxels in the Gaussian
        window, shape `(..., d, h, w)`, non-negative.

        Both are float64 for a float64 volume and float32 otherwise, on the volume's device.

    Notes
    -----
    The filter is separable: three 1D convolutions along x, y and z, with each axis padded by
    mirroring about its edge voxels. Each pass works on chunks of at most 2²² elements, so the
    extra memory is about three volume-sized buffers, whatever the volume's size.
    """
    _check_volume(volume, ndim=None)
    sigma_px = _check_sigma(sigma_px)
    kernel = _gaussian_kernel(sigma_px, _work_dtype(volume), volume.device)
    if volume.ndim == 3:
        return _local_mean_std_3d(volume, kernel)
    batch_shape, shape = volume.shape[:-3], volume.shape[-3:]
    flat = volume.reshape(-1, *shape)
    means, stds = [], []
    for item in flat:
        mean, std = _local_mean_std_3d(item, kernel)
        means.append(mean)
        stds.append(std)
    mean = torch.stack(means).reshape(*batch_shape, *shape)
    std = torch.stack(stds).reshape(*batch_shape, *shape)
    return mean, std


def _bin(volume: torch.Tensor, factor: int, dtype: torch.dtype) -> torch.Tensor:
    """Average over blocks of ``factor³`` voxels, `(d, h, w)` to `(⌈d/f⌉, ⌈h/f⌉, ⌈w/f⌉)`.

    Partial blocks at the far edges average the voxels they hold.
    """
    d, h, w = volume.shape
    out = torch.empty(
        (math.ceil(d / factor), math.ceil(h / factor), math.ceil(w / factor)),
        dtype=dtype,
        device=volume.device,
    )
    step = max(1, _CHUNK_ELEMENTS // (factor * h * w))
    for start in range(0, out.shape[0], step):
        block = volume[start * factor : (start + step) * factor].to(dtype)
        out[start : start + step] = F.avg_pool3d(
            block[None, None], kernel_size=factor, ceil_mode=True
        )[0, 0]
    return out


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile (nearest rank) of ``values``, from an evenly strided subset.

    Selection with ``kthvalue`` is faster than sorting and has no size limit, unlike
    ``torch.quantile``.
    """
    flat = values.reshape(-1)
    flat = flat[:: math.ceil(flat.numel() / _MAX_QUANTILE_SAMPLES)]
    rank = min(flat.numel(), max(1, round(q * (flat.numel() - 1)) + 1))
    return flat.kthvalue(rank).values


def _keep_fraction(score: torch.Tensor, region: torch.Tensor, percentage: float) -> torch.Tensor:
    """Voxels whose score is among the top ``percentage`` % of the scores in ``region``."""
    if percentage <= 0.0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = _quantile(region, 1.0 - percentage / 100.0)
    return score >= threshold


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    size = 2 * radius + 1
    pooled = F.max_pool3d(mask[None, None].float(), size, stride=1, padding=radius)
    return pooled[0, 0] > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    # max_pool3d pads with -inf, so voxels beyond the edge never erode the mask.
    return ~_dilate(~mask, radius)


def _sample_z_range(std: torch.Tensor, z_start: int, z_stop: int) -> tuple[int, int]:
    """Slices ``[start, stop)`` of `(d, h, w)` ``std`` holding the sample, within the range."""
    profile = std[z_start:z_stop].mean(dim=(1, 2))
    floor, peak = float(profile.min()), float(profile.max())
    if peak <= 0.0 or peak - floor < _AUTO_Z_MIN_CONTRAST * peak:
        return z_start, z_stop
    above = torch.nonzero(profile >= floor + 0.5 * (peak - floor)).flatten()
    return z_start + int(above[0]), z_start + int(above[-1]) + 1


def _upsample(mask: torch.Tensor, factor: int, shape: torch.Size) -> torch.Tensor:
    """Nearest-neighbour inverse of :func:`_bin`, cropped to ``shape``."""
    for axis, size in enumerate(shape):
        mask = mask.repeat_interleave(factor, dim=axis).narrow(axis, 0, size)
    return mask


def sample_mask(
    volume: torch.Tensor,
    *,
    density_percentage: float = 50.0,
    std_percentage: float = 50.0,
    sigma_px: float = 2.0,
    bin_factor: int = 1,
    z_crop: float = 0.0,
    auto_z: bool = True,
    polarity: str = "both",
    morphology_px: int = 1,
) -> torch.Tensor:
    """Mask of the voxels of a tomogram that hold the sample, in the spirit of IsoNet.

    Parameters
    ----------
    volume : torch.Tensor
        Tomogram, shape `(d, h, w)` in `zyx` order, real-valued, on any device.
    density_percentage : float
        Percentage (0–100) of the voxels that the density criterion keeps: those whose local
        mean departs most from the background (see ``polarity``).
    std_percentage : float
        Percentage (0–100) of the voxels that the structure criterion keeps: those with the
        highest local standard deviation.
    sigma_px : float
        Width (standard deviation, in voxels of ``volume``) of the Gaussian that first smooths
        the volume and then weights the local mean and standard deviation, as IsoNet's
        ``patch_size``. A few voxels, up to the size of the features that mark the sample.
    bin_factor : int
        Compute on a copy of the volume averaged over blocks of ``bin_factor³`` voxels, and
        bring the mask back to the full grid by nearest neighbour. Binning suppresses noise and
        divides time and memory by about ``bin_factor³``: besides the input and the output, the
        computation holds about six float32 buffers of the binned volume's size, i.e. about
        12 GB for a tomogram of 500 × 1000 × 1000 voxels at 1 and 1.5 GB at 2. Use 2–4 for
        tomograms of that size.
    z_crop : float
        Fraction in [0, 0.5) of the slices zeroed at each end of the z axis, as IsoNet's
        ``z_crop``: ``round(z_crop * d)`` slices at the top and as many at the bottom.
    auto_z : bool
        Also zero the empty ice above and below the specimen, found from the z profile of the
        local standard deviation (see Notes).
    polarity : {"both", "dark", "bright"}
        What counts as dense: a local mean far from the median on either side (``"both"``,
        the same mask for ``v`` and ``-v``), only below it (``"dark"``, dense matter dark as
        in raw cryo-ET data and IsoNet's inverted density) or only above it (``"bright"``).
    morphology_px : int
        Radius in voxels of ``volume`` of the cubic structuring element of the clean-up: a
        binary opening removes specks, then a closing fills small holes. On the binned grid
        the radius is ``max(1, round(morphology_px / bin_factor))``; 0 skips the clean-up.

    Returns
    -------
    torch.Tensor
        The mask, shape `(d, h, w)`, float32 with values 0 and 1, on the volume's device.

    Notes
    -----
    The volume is smoothed with a Gaussian of width ``sigma_px`` to suppress noise, and the
    local mean ``m`` and local standard deviation ``s`` of the smoothed volume are taken
    in a Gaussian window of the same width (:func:`local_mean_std`). Smoothing first is what
    makes ``s`` measure structure rather than noise, which is uniform over the tomogram.

    With ``auto_z``, the mean of ``s`` over each xy slice gives a z profile that is high
    inside the specimen and drops to a floor in the empty ice or vacuum above and below it.
    Slices from the first to the last at which the profile reaches halfway from its floor to
    its peak are kept; when the profile varies by less than 20 % of its peak, no empty region
    stands out and every slice is kept.

    The percentages refer to the voxels of the slices kept by ``z_crop`` and ``auto_z``, so
    empty ice does not distort the thresholds: the density criterion keeps the voxels whose
    deviation of ``m`` from the median of ``m`` is among the top ``density_percentage`` %,
    the structure criterion those whose ``s`` is among the top ``std_percentage`` %, and a
    voxel is in the mask when either criterion keeps it. The clean-up operators are
    increasing, so a higher percentage never removes a voxel from the mask.

    Blurring widens what the criteria see by about ``sigma_px``: a sharp ice surface is itself
    structure, so ``auto_z`` keeps one or two slices (about ``sigma_px``) of the empty space
    next to it. In a reconstructed tomogram the missing wedge removes the low kz frequencies
    that separate ice from vacuum, so the density criterion is weak there, and the structure
    criterion and ``auto_z`` carry most of the information.

    References
    ----------
    Y.-T. Liu et al., "Isotropic reconstruction for electron tomography with deep learning",
    Nature Communications 13, 6482 (2022).
    """
    _check_volume(volume, ndim=3)
    for name, value in (
        ("density_percentage", density_percentage),
        ("std_percentage", std_percentage),
    ):
        if not _is_real(value) or not 0.0 <= value <= 100.0:
            raise ValueError(f"{name} must be a number in [0, 100], got {value!r}")
    sigma_px = _check_sigma(sigma_px)
    if not _is_int(bin_factor) or bin_factor < 1:
        raise ValueError(f"bin_factor must be a positive integer, got {bin_factor!r}")
    if not _is_real(z_crop) or not 0.0 <= z_crop < 0.5:
        raise ValueError(f"z_crop must be a number in [0, 0.5), got {z_crop!r}")
    if not isinstance(auto_z, bool):
        raise ValueError(f"auto_z must be True or False, got {auto_z!r}")
    if polarity not in _POLARITIES:
        raise ValueError(f"polarity must be one of {_POLARITIES}, got {polarity!r}")
    if not _is_int(morphology_px) or morphology_px < 0:
        raise ValueError(f"morphology_px must be a non-negative integer, got {morphology_px!r}")
    if not bool(torch.isfinite(volume).all()):
        raise ValueError("volume must not contain NaN or infinite values")

    shape = volume.shape
    dtype = _work_dtype(volume)
    binned = _bin(volume, bin_factor, dtype) if bin_factor > 1 else volume.to(dtype)
    kernel = _gaussian_kernel(sigma_px / bin_factor, dtype, volume.device)
    mean, std = _local_mean_std_3d(_gaussian_filter(binned, kernel), kernel)
    del binned

    n_crop = round(z_crop * shape[0])
    z_start = n_crop // bin_factor
    z_stop = max(z_start + 1, math.ceil((shape[0] - n_crop) / bin_factor))
    if auto_z:
        z_start, z_stop = _sample_z_range(std, z_start, z_stop)

    deviation = mean.sub_(_quantile(mean[z_start:z_stop], 0.5))
    if polarity == "both":
        deviation.abs_()
    elif polarity == "dark":
        deviation.neg_()
    keep = _keep_fraction(deviation, deviation[z_start:z_stop], float(density_percentage))
    keep |= _keep_fraction(std, std[z_start:z_stop], float(std_percentage))
    del mean, std, deviation

    if morphology_px > 0:
        radius = max(1, round(morphology_px / bin_factor))
        keep = _dilate(_erode(keep, radius), radius)
        keep = _erode(_dilate(keep, radius), radius)
    keep[:z_start] = False
    keep[z_stop:] = False
    if bin_factor > 1:
        keep = _upsample(keep, bin_factor, shape)
    keep[:n_crop] = False
    keep[shape[0] - n_crop :] = False
    return keep.to(torch.float32)
