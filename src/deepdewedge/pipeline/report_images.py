"""The images of the dataset report: central slices and the xz power spectrum, as PNG bytes.

Volumes of any size are binned while read (memory maps slab by slab) before anything is
drawn, and the images are stored with few grey levels, so that a page of hundreds of
tomograms stays small.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from deepdewedge.pipeline.common import binned_preview

__all__ = ["mean_xz_power_spectrum", "tomogram_images"]

# Volumes are binned to at most this many voxels (and this many per side) before anything
# is drawn: enough for the spectrum, and a single streamed pass over a memory map.
_PREVIEW_VOXELS = 1 << 23
_PREVIEW_SIDE = 512
# Grey levels of the stored images. Slices are mostly noise, which looks the same in 16
# levels and compresses to about 4 bits a pixel instead of 8: that keeps a page of hundreds
# of tomograms small. Spectra are smooth, would show contour steps in 16 levels, and stay
# small in 32.
_SLICE_LEVELS = 16
_SPECTRUM_LEVELS = 32
_DPI = 100
_LABEL_PX = 22  # room for row labels on the left and column titles on top
_GAP_PX = 4
_FONT_PT = 9


def tomogram_images(
    input_volume: np.ndarray,
    refined_volume: np.ndarray,
    half_difference: np.ndarray | None = None,
    *,
    panel_px: int = 168,
) -> dict[str, bytes]:
    """Small PNG images that show what refinement did to one tomogram.

    Parameters
    ----------
    input_volume : numpy.ndarray
        The tomogram before refinement, shape `(d, h, w)`; any size, typically a memory map.
    refined_volume : numpy.ndarray
        The refined tomogram, shape `(d, h, w)`.
    half_difference : numpy.ndarray, optional
        Difference of the two refined halves, shape `(d, h, w)`.
    panel_px : int
        Length in pixels of the longer side of the xy slice, and of the spectrum panels.

    Returns
    -------
    dict of str to bytes
        ``"orthoslices"``: one column per volume (input, refined, half-difference) and one row
        per central slice: xy at ``z = d // 2``, xz at ``y = h // 2`` and yz at ``x = w // 2``,
        all at one scale, z pointing down. ``"power_spectrum"``: the (kz, kx) power spectrum
        ``log |F|²`` of the input and of the refined tomogram, zero frequency in the centre,
        kz vertical, both axes spanning the same frequency range so that angles are true.
        Grey levels of each slice run from its 0.5th to its 99.5th percentile.

    Notes
    -----
    Each volume is first binned to at most 2²³ voxels, reading a memory map slab by slab, so
    neither time nor memory depends much on the tomogram's size. The spectrum is the mean of
    the power spectra of all xz slices: the 3D power spectrum averaged over ky, where the
    missing wedge (tilt axis y) is the same for every ky; the mean keeps the wedge and
    removes the speckle of a single central slice. The volume is tapered towards its z and
    x faces first, so that its borders do not draw bright lines along the axes. In the input
    the missing wedge is a dark double cone around the vertical kz axis; refinement fills it.
    """
    if isinstance(panel_px, bool) or not isinstance(panel_px, int) or panel_px < 16:
        raise ValueError(f"panel_px must be an integer of at least 16, got {panel_px!r}")
    volumes = {"input": input_volume, "refined": refined_volume}
    if half_difference is not None:
        volumes["half-difference"] = half_difference
    for name, volume in volumes.items():
        shape = tuple(getattr(volume, "shape", ()))
        if len(shape) != 3 or 0 in shape:
            raise ValueError(f"{name} volume must have shape (d, h, w), got {shape}")
    previews = {
        name: binned_preview(volume, max_voxels=_PREVIEW_VOXELS, max_side=_PREVIEW_SIDE)
        for name, volume in volumes.items()
    }
    spectra = {name: mean_xz_power_spectrum(previews[name]) for name in ("input", "refined")}
    return {
        "orthoslices": _orthoslice_png(previews, panel_px),
        "power_spectrum": _spectrum_png(spectra, panel_px),
    }


def mean_xz_power_spectrum(volume: np.ndarray, *, taper: float = 0.1) -> np.ndarray:
    """``log`` of the mean (kz, kx) power spectrum of the xz slices of a volume.

    Parameters
    ----------
    volume : numpy.ndarray
        Volume of shape `(d, h, w)`.
    taper : float
        Fraction of the volume at each z and x face that is faded to zero with a raised
        cosine before the transform.

    Returns
    -------
    numpy.ndarray
        ``log`` of the power, shape `(d, w)`, float64, zero frequency at ``(d // 2, w // 2)``.
    """
    d, h, w = volume.shape
    weights = _cosine_taper(d, taper)[:, None] * _cosine_taper(w, taper)[None, :]
    mean = float(np.mean(volume, dtype=np.float64))
    power = np.zeros((d, w))
    step = max(1, (1 << 22) // (d * w))
    for y0 in range(0, h, step):
        slab = (np.asarray(volume[:, y0 : y0 + step], dtype=np.float64) - mean) * weights[:, None]
        power += (np.abs(np.fft.fft2(slab, axes=(0, 2))) ** 2).sum(axis=1)
    power = np.fft.fftshift(power / h)
    return np.log(power + 1e-12 * power.max() + 1e-30)


def _cosine_taper(n: int, fraction: float) -> np.ndarray:
    """Weights of shape `(n,)`: 1 inside, a raised cosine over `fraction` of `n` at each end."""
    weights = np.ones(n)
    m = min(n // 2, round(fraction * n))
    if m > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
        weights[:m] = ramp
        weights[n - m :] = ramp[::-1]
    return weights


def _grey(image: np.ndarray, levels: int, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """`(h, w)` image as uint8 grey values from its `low` to `high` percentile.

    The values are `levels` evenly spaced greys from 0 to 255, so that they survive the
    palette of :func:`_encode` with as many `levels` unchanged.
    """
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [low, high]) if finite.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 1.0, lo + 1.0
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    steps = np.round(scaled * (levels - 1))
    return np.round(steps * 255.0 / (levels - 1)).astype(np.uint8)


def _resized(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`(h, w)` image resampled to `(rows, cols)` (mean over each output pixel's area)."""
    if image.shape == (rows, cols):
        return image.astype(np.float32)
    return np.asarray(
        Image.fromarray(image.astype(np.float32), "F").resize((cols, rows), Image.Resampling.BOX)
    )


def _central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices xy at ``z = d // 2``, xz at ``y = h // 2``, yz at ``x = w // 2`` of `(d, h, w)`."""
    d, h, w = volume.shape
    return volume[d // 2], volume[:, h // 2, :], volume[:, :, w // 2]


def _orthoslice_png(previews: Mapping[str, np.ndarray], panel_px: int) -> bytes:
    """PNG of the central slices of each volume, one column per volume."""
    d0, h0, w0 = next(iter(previews.values())).shape
    scale = panel_px / max(h0, w0)
    columns = []
    for volume in previews.values():
        panels = []
        for image in _central_slices(volume):
            rows = max(1, round(image.shape[0] * scale))
            cols = max(1, round(image.shape[1] * scale))
            panels.append(_grey(_resized(image, rows, cols), _SLICE_LEVELS))
        columns.append(panels)
    col_widths = [max(p.shape[1] for p in panels) for panels in columns]
    row_heights = [max(panels[r].shape[0] for panels in columns) for r in range(3)]
    x0 = [_LABEL_PX + sum(col_widths[:c]) + c * _GAP_PX for c in range(len(columns))]
    y0 = [_LABEL_PX + sum(row_heights[:r]) + r * _GAP_PX for r in range(3)]
    canvas = np.full((y0[-1] + row_heights[-1] + 2, x0[-1] + col_widths[-1] + 2), 255, np.uint8)
    for c, panels in enumerate(columns):
        for r, panel in enumerate(panels):
            canvas[y0[r] : y0[r] + panel.shape[0], x0[c] : x0[c] + panel.shape[1]] = panel
    labels = [
        (name, x0[c] + col_widths[c] / 2, _LABEL_PX / 2, 0) for c, name in enumerate(previews)
    ]
    labels += [
        (plane, _LABEL_PX / 2, y0[r] + row_heights[r] / 2, 90)
        for r, plane in enumerate(("xy", "xz", "yz"))
    ]
    return _encode(canvas, labels, _SLICE_LEVELS)


def _spectrum_png(spectra: Mapping[str, np.ndarray], panel_px: int) -> bytes:
    """PNG of square (kz, kx) spectrum panels side by side, with titles and axis names."""
    x0 = [_LABEL_PX + c * (panel_px + _GAP_PX) for c in range(len(spectra))]
    canvas = np.full((2 * _LABEL_PX + panel_px, x0[-1] + panel_px + 2), 255, np.uint8)
    labels = []
    for c, (name, spectrum) in enumerate(spectra.items()):
        square = np.asarray(
            Image.fromarray(spectrum.astype(np.float32), "F").resize(
                (panel_px, panel_px), Image.Resampling.BILINEAR
            )
        )
        canvas[_LABEL_PX : _LABEL_PX + panel_px, x0[c] : x0[c] + panel_px] = _grey(
            square, _SPECTRUM_LEVELS, 1.0, 99.8
        )
        labels.append((name, x0[c] + panel_px / 2, _LABEL_PX / 2, 0))
        labels.append(("kx", x0[c] + panel_px / 2, 1.5 * _LABEL_PX + panel_px, 0))
    labels.append(("kz", _LABEL_PX / 2, _LABEL_PX + panel_px / 2, 90))
    return _encode(canvas, labels, _SPECTRUM_LEVELS)


def _encode(
    canvas: np.ndarray, labels: Sequence[tuple[str, float, float, float]], levels: int
) -> bytes:
    """PNG bytes of a grey `(h, w)` uint8 canvas with centred text labels drawn on it.

    Labels are ``(text, x_px, y_px, rotation_deg)`` with y counted from the top. The image
    is stored with a palette of `levels` greys and no PNG filter, the smallest encoding for
    noisy slices.
    """
    height, width = canvas.shape
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)
    figure.figimage(np.repeat(canvas[..., None], 3, axis=2), 0, 0, origin="upper")
    for text, x, y, rotation in labels:
        figure.text(
            x / width,
            1.0 - y / height,
            text,
            ha="center",
            va="center",
            rotation=rotation,
            fontsize=_FONT_PT,
        )
    figure.canvas.draw()
    rgb = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(np.float32)
    figure.clear()
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    indices = np.round(grey * (levels - 1) / 255.0).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    steps = np.round(np.arange(levels) * 255.0 / (levels - 1)).astype(int)
    image.putpalette(np.repeat(steps, 3).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
