"""Binning (downsampling by an integer factor) of images and volumes.

Two methods. ``"fourier"`` (Fourier cropping) keeps the frequencies below the binned grid's
Nyquist frequency and drops the rest, so nothing above it aliases into the result; it is the
default for tilt series. ``"average"`` (average pooling, what ``newstack -bin`` does) is the mean
of each ``factor × ... × factor`` block: cheaper, and exactly local, but it attenuates
frequencies near the new Nyquist and folds those above it back into the result.

Both methods first crop every binned axis to a multiple of ``factor``, dropping
``r = n mod factor`` pixels: ``r // 2`` at the start and the rest at the end. A binned pixel
``j`` then covers input pixels ``[s + j factor, s + (j + 1) factor)`` (``s = r // 2``) and is
centred on input position ``s + j factor + (factor - 1) / 2``, so the centre of the binned
axis, ``(n // factor - 1) / 2``, falls on the centre of the input axis, ``(n - 1) / 2``, when
``r`` is even and half an input pixel before it when ``r`` is odd. In general input position
``c`` (in pixels from the first pixel's centre) maps to binned position
``(c - s - (factor - 1) / 2) / factor``; e.g. a tilt axis ``o`` pixels right of the input
centre lies ``(o + (r mod 2) / 2) / factor`` binned pixels right of the binned centre.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["bin_images", "bin_volume"]

_METHODS = ("fourier", "average")
# Upper bound on the number of input elements transformed at once by the Fourier method.
_MAX_BUFFER_ELEMENTS = 2**24


def _check(array: torch.Tensor, factor, method: str, ndim: int, name: str) -> int:
    if not isinstance(array, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(array).__name__}")
    if array.ndim < ndim:
        raise ValueError(
            f"{name} must have at least {ndim} dimensions, got shape {tuple(array.shape)}"
        )
    if array.is_complex():
        raise ValueError(f"{name} must be real-valued")
    if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    sizes = array.shape[-ndim:]
    if any(size < factor for size in sizes):
        raise ValueError(
            f"factor {factor} is larger than the {name} size {tuple(sizes)} along some axis"
        )
    return int(factor)


def _crop(array: torch.Tensor, factor: int, ndim: int) -> torch.Tensor:
    """Crop the last ``ndim`` axes to multiples of ``factor``, the remainder split as documented."""
    index = [slice(None)] * (array.ndim - ndim)
    for size in array.shape[-ndim:]:
        start = (size % factor) // 2
        index.append(slice(start, start + (size // factor) * factor))
    return array[tuple(index)]


def _average(array: torch.Tensor, factor: int, ndim: int) -> torch.Tensor:
    """Mean over ``factor``-sized blocks of the last ``ndim`` axes (sizes divisible by factor)."""
    lead = array.shape[:-ndim]
    split = []
    for size in array.shape[-ndim:]:
        split += [size // factor, factor]
    blocks = array.reshape(*lead, *split)
    block_axes = tuple(range(len(lead) + 1, len(lead) + 2 * ndim, 2))
    return blocks.mean(dim=block_axes)


def _fourier(array: torch.Tensor, factor: int, ndim: int) -> torch.Tensor:
    """Fourier cropping of the last ``ndim`` axes (sizes divisible by factor); see Notes."""
    dims = tuple(range(-ndim, 0))
    sizes = array.shape[-ndim:]
    out_sizes = [size // factor for size in sizes]
    spectrum = torch.fft.rfftn(array, dim=dims)
    cropped = spectrum.new_zeros((*array.shape[:-ndim], *out_sizes[:-1], out_sizes[-1] // 2 + 1))
    # Full axes: frequencies -(m - 1) // 2 ... (m - 1) // 2, i.e. |k| < m / 2 (no Nyquist bin).
    index_in = []
    index_out = []
    for size, out in zip(sizes[:-1], out_sizes[:-1], strict=True):
        n_pos, n_neg = (out + 1) // 2, (out - 1) // 2
        keep = torch.cat([torch.arange(n_pos), torch.arange(size - n_neg, size)])
        index_in.append(keep)
        index_out.append(torch.cat([torch.arange(n_pos), torch.arange(out - n_neg, out)]))
    # Last (half) axis: 0 ... (m - 1) // 2; for even m the Nyquist column stays zero.
    n_last = (out_sizes[-1] - 1) // 2 + 1
    index_in.append(torch.arange(n_last))
    index_out.append(torch.arange(n_last))
    device = array.device
    grid_in = torch.meshgrid(*[i.to(device) for i in index_in], indexing="ij")
    grid_out = torch.meshgrid(*[i.to(device) for i in index_out], indexing="ij")
    cropped[(..., *grid_out)] = spectrum[(..., *grid_in)]
    # Shift by (factor - 1) / 2 input pixels so that samples fall on the block centres, and
    # rescale so that the mean is kept (the inverse transform divides by fewer points).
    shift = (factor - 1) / 2
    phase = torch.zeros(cropped.shape[-ndim:], device=device, dtype=torch.float64)
    for axis, (size, out) in enumerate(zip(sizes, out_sizes, strict=True)):
        if axis == ndim - 1:
            k = torch.arange(out // 2 + 1, device=device, dtype=torch.float64)
        else:
            k = torch.fft.fftfreq(out, d=1.0 / out, device=device, dtype=torch.float64)
        shape = [1] * ndim
        shape[axis] = -1
        phase = phase + (2.0 * math.pi * shift / size) * k.reshape(shape)
    ramp = torch.polar(torch.full_like(phase, factor ** (-ndim)), phase).to(cropped.dtype)
    return torch.fft.irfftn(cropped * ramp, s=out_sizes, dim=dims)


def _bin(array: torch.Tensor, factor: int, method: str, ndim: int) -> torch.Tensor:
    dtype = array.dtype if array.is_floating_point() else torch.float32
    if factor == 1:
        return array.to(dtype).clone()
    cropped = _crop(array.to(dtype), factor, ndim)
    if method == "average":
        return _average(cropped, factor, ndim)
    # float16/bfloat16 are transformed in float32 and returned in their own dtype.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    lead = cropped.shape[:-ndim]
    flat = cropped.reshape(-1, *cropped.shape[-ndim:])
    out_sizes = [size // factor for size in cropped.shape[-ndim:]]
    out = torch.empty((flat.shape[0], *out_sizes), device=array.device, dtype=dtype)
    chunk = max(1, _MAX_BUFFER_ELEMENTS // max(1, math.prod(cropped.shape[-ndim:])))
    for i0 in range(0, flat.shape[0], chunk):
        i1 = min(flat.shape[0], i0 + chunk)
        out[i0:i1] = _fourier(flat[i0:i1].to(work), factor, ndim).to(dtype)
    return out.reshape(*lead, *out_sizes)


def bin_images(images: torch.Tensor, factor: int, *, method: str = "fourier") -> torch.Tensor:
    """Bin images (e.g. a tilt series) by an integer factor along their last two axes.

    Parameters
    ----------
    images : torch.Tensor
        Images, shape `(..., h, w)`, real-valued.
    factor : int
        Binning factor ``b >= 1``; at most ``min(h, w)``.
    method : {"fourier", "average"}
        ``"fourier"``: Fourier cropping (see Notes). ``"average"``: the mean of each
        ``b × b`` block.

    Returns
    -------
    torch.Tensor
        Binned images, shape `(..., h // b, w // b)`, on the device and floating dtype of
        ``images`` (float32 for integer input). ``factor=1`` returns a copy.

    Notes
    -----
    Each axis is first cropped to a multiple of ``b`` as described in the module docstring.
    Fourier cropping then keeps the discrete Fourier coefficients with ``|k| < m / 2`` along
    each axis (``m`` the binned size; for even ``m`` the Nyquist coefficient, which a real
    image cannot carry once shifted, is dropped), shifts them by ``(b - 1) / 2`` input pixels
    and scales them by ``1 / b²``. The result is the band-limited (periodic sinc)
    interpolant of the image, low-passed to the binned grid, sampled at the centres of the
    ``b × b`` blocks: the same positions as average pooling, with the same mean, but without
    its attenuation below the new Nyquist frequency or aliasing above it. Like any DFT-based
    method it treats each image as periodic, so a strong jump between opposite edges rings
    slightly near them.
    """
    factor = _check(images, factor, method, 2, "images")
    return _bin(images, factor, method, 2)


def bin_volume(volume: torch.Tensor, factor: int, *, method: str = "fourier") -> torch.Tensor:
    """Bin volumes by an integer factor along their last three axes.

    Parameters
    ----------
    volume : torch.Tensor
        Volume, shape `(..., d, h, w)`, real-valued.
    factor : int
        Binning factor ``b >= 1``; at most ``min(d, h, w)``.
    method : {"fourier", "average"}
        ``"fourier"``: Fourier cropping, as in :func:`bin_images` but in 3D (coefficients scaled
        by ``1 / b³``). ``"average"``: the mean of each ``b × b × b`` block.

    Returns
    -------
    torch.Tensor
        Binned volume, shape `(..., d // b, h // b, w // b)`, on the device and floating dtype
        of ``volume`` (float32 for integer input). ``factor=1`` returns a copy.
    """
    factor = _check(volume, factor, method, 3, "volume")
    return _bin(volume, factor, method, 3)
