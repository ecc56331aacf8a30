"""Figures for inspecting tomograms and model fitting (matplotlib, Agg canvas, no pyplot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

__all__ = [
    "orthoslice_figure",
    "loss_curve_figure",
    "mask_overlay_figure",
    "fsc_curve_figure",
    "gold_erasure_figure",
]

_COLUMN_TITLES = ("xy (z = d//2)", "xz (y = h//2)", "yz (x = w//2)", "log |FFT|² xz (ky = 0)")


def _to_numpy(volume: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        array = volume.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(volume, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"volume {name!r} must have shape (d, h, w), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"volume {name!r} is empty")
    return array


def _contrast_limits(image: np.ndarray, clip_std: float) -> tuple[float, float]:
    mean, std = float(image.mean()), float(image.std())
    if std == 0.0:
        return mean - 1.0, mean + 1.0
    return mean - clip_std * std, mean + clip_std * std


def _central_power_slice(volume: np.ndarray) -> np.ndarray:
    """Central (kz, kx) slice at ky = 0 of log(|FFT|²), fftshifted, shape `(d, w)`."""
    spectrum = np.fft.fftshift(np.fft.fftn(volume - volume.mean()))
    power = np.abs(spectrum[:, volume.shape[1] // 2, :]) ** 2
    return np.log(power + 1e-12 * power.max() + 1e-30)


def orthoslice_figure(
    volumes: Mapping[str, np.ndarray | torch.Tensor],
    *,
    clip_std: float = 3.0,
) -> Figure:
    """Central orthogonal slices and the central xz power spectrum of named volumes.

    Parameters
    ----------
    volumes : mapping of str to numpy.ndarray or torch.Tensor
        Named volumes, each of shape `(d, h, w)` (shapes may differ between volumes). One row
        per volume, in the mapping's order, titled with its name.
    clip_std : float
        Each slice is shown with grey levels from ``mean - clip_std * std`` to
        ``mean + clip_std * std`` of that slice.

    Returns
    -------
    matplotlib.figure.Figure
        A figure with ``4 * len(volumes)`` axes: per row the xy slice at ``z = d // 2``, the
        xz slice at ``y = h // 2``, the yz slice at ``x = w // 2``, and the central xz slice
        (``ky = 0``) of ``log |FFT|²`` with the zero frequency in the centre, where the missing
        wedge shows as a dark double cone around the vertical kz axis. The figure is attached
        to an Agg canvas and is not shown or saved.
    """
    if not isinstance(volumes, Mapping) or len(volumes) == 0:
        raise ValueError("volumes must be a non-empty mapping of names to (d, h, w) volumes")
    if not np.isfinite(clip_std) or clip_std <= 0:
        raise ValueError(f"clip_std must be positive, got {clip_std!r}")
    arrays = {str(name): _to_numpy(vol, str(name)) for name, vol in volumes.items()}

    d0, h0, w0 = next(iter(arrays.values())).shape
    width_ratios = [w0, w0, h0, w0]
    row_height = max(h0, d0) / sum(width_ratios) * 12.0 + 0.6
    fig = Figure(figsize=(12.0, row_height * len(arrays)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(arrays), 4, squeeze=False, width_ratios=width_ratios)
    for row, (name, volume) in enumerate(arrays.items()):
        d, h, w = volume.shape
        panels = (
            volume[d // 2],
            volume[:, h // 2, :],
            volume[:, :, w // 2],
            _central_power_slice(volume),
        )
        for col, (ax, image) in enumerate(zip(axes[row], panels, strict=True)):
            vmin, vmax = _contrast_limits(image, clip_std)
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_COLUMN_TITLES[col], fontsize=8)
        axes[row][0].set_ylabel(name, fontsize=10)
    return fig


def loss_curve_figure(
    epochs: Sequence[float] | np.ndarray | torch.Tensor,
    fitting_loss: Sequence[float] | np.ndarray | torch.Tensor,
    val_loss: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> Figure:
    """Fitting (and validation) loss against epoch on a logarithmic y axis.

    Parameters
    ----------
    epochs : array-like
        Epoch numbers, shape `(n,)`.
    fitting_loss : array-like
        Loss on the fitting data at those epochs, shape `(n,)`, positive.
    val_loss : array-like, optional
        Loss on the validation data at the same epochs, shape `(n,)`, positive. Entries that
        are None or NaN (epochs without validation) are skipped.

    Returns
    -------
    matplotlib.figure.Figure
        A figure with one axes, attached to an Agg canvas, not shown or saved.
    """

    def as_1d(values, name: str) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float64).numpy()
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
        return array

    x = as_1d(epochs, "epochs")
    curves = {"fitting loss": as_1d(fitting_loss, "fitting_loss")}
    if val_loss is not None:
        curves["validation loss"] = as_1d(val_loss, "val_loss")
    for label, values in curves.items():
        if values.shape != x.shape:
            raise ValueError(f"{label} has {values.size} values but epochs has {x.size}")
    if x.size == 0:
        raise ValueError("epochs must not be empty")

    fig = Figure(figsize=(5.0, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, values in curves.items():
        finite = np.isfinite(values)
        ax.plot(x[finite], values[finite], marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


def mask_overlay_figure(
    volume: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    *,
    clip_std: float = 3.0,
) -> Figure:
    """Central orthogonal slices of a volume with a mask drawn over them.

    Parameters
    ----------
    volume : numpy.ndarray or torch.Tensor
        Volume, shape `(d, h, w)`, shown in grey.
    mask : numpy.ndarray or torch.Tensor
        Mask of the same shape `(d, h, w)`; voxels where it exceeds 0.5 (True for booleans) are
        inside. They are tinted in semi-transparent orange and the mask's outline is drawn.
    clip_std : float
        Each slice is shown with grey levels from ``mean - clip_std * std`` to
        ``mean + clip_std * std`` of that slice.

    Returns
    -------
    matplotlib.figure.Figure
        A figure with 3 axes: the xy slice at ``z = d // 2``, the xz slice at ``y = h // 2`` and
        the yz slice at ``x = w // 2``, each titled with its plane and the fraction of its
        pixels inside the mask. The figure is attached to an Agg canvas and is not shown or
        saved.
    """
    if not np.isfinite(clip_std) or clip_std <= 0:
        raise ValueError(f"clip_std must be positive, got {clip_std!r}")
    image = _to_numpy(volume, "volume")
    inside = _to_numpy(mask, "mask") > 0.5
    if inside.shape != image.shape:
        raise ValueError(
            f"mask has shape {inside.shape} but volume has shape {image.shape}; they must match"
        )

    d, h, w = image.shape
    width_ratios = [w, w, h]
    height = max(h, d) / sum(width_ratios) * 10.0 + 0.8
    fig = Figure(figsize=(10.0, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, width_ratios=width_ratios)
    index = ((d // 2, slice(None), slice(None)), (slice(None), h // 2), (Ellipsis, w // 2))
    tint = np.array([1.0, 0.55, 0.0, 0.35])
    for ax, title, where in zip(axes, _COLUMN_TITLES[:3], index, strict=True):
        plane, region = image[where], inside[where]
        vmin, vmax = _contrast_limits(plane, clip_std)
        ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, aspect="equal")
        ax.imshow(region[..., None] * tint, aspect="equal", interpolation="nearest")
        if region.any() and not region.all():
            ax.contour(region.astype(float), levels=[0.5], colors="orange", linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title}, {region.mean():.0%} in mask", fontsize=8)
    return fig


def fsc_curve_figure(
    panels: Mapping[str, Mapping[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]],
    *,
    thresholds: Sequence[float] = (0.143, 0.5),
    ylabel: str = "FSC",
) -> Figure:
    """Fourier shell correlation curves, one panel per kind of FSC, one line per volume.

    Parameters
    ----------
    panels : mapping of str to mapping of str to (array-like, array-like)
        Panel title (e.g. ``"tomogram"``, ``"particles, inside the missing wedge"``) to a mapping
        of line label (e.g. ``"FBP"``, ``"DeepDeWedge"``) to ``(frequencies, fsc)``: shell
        frequencies in 1/Å and FSC values, both of shape `(n_shells,)`. NaN values are skipped.
    thresholds : sequence of float
        FSC thresholds drawn as dashed horizontal lines.
    ylabel : str, default "FSC"
        Label of the correlation axis (e.g. "FRC" for ring correlations).

    Returns
    -------
    matplotlib.figure.Figure
        A figure with one axes per panel, side by side, sharing the FSC axis, with the x axis
        in spatial frequency (1/Å); attached to an Agg canvas, not shown or saved.
    """
    if not isinstance(panels, Mapping) or len(panels) == 0:
        raise ValueError("panels must be a non-empty mapping of titles to curves")
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for title, lines in panels.items():
        if not isinstance(lines, Mapping) or len(lines) == 0:
            raise ValueError(f"panel {title!r} must be a non-empty mapping of labels to curves")
        data[str(title)] = {}
        for label, (frequencies, values) in lines.items():
            x = _to_1d(frequencies, f"frequencies of {label!r}")
            y = _to_1d(values, f"FSC of {label!r}")
            if x.shape != y.shape:
                raise ValueError(
                    f"curve {label!r} in panel {title!r} has {x.size} frequencies but "
                    f"{y.size} FSC values"
                )
            data[str(title)][str(label)] = (x, y)

    fig = Figure(figsize=(4.0 * len(data) + 0.5, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(data), squeeze=False, sharey=True)[0]
    for ax, (title, lines) in zip(axes, data.items(), strict=True):
        for threshold in thresholds:
            ax.axhline(float(threshold), color="grey", linestyle="--", linewidth=0.8)
        for label, (x, y) in lines.items():
            finite = np.isfinite(y)
            ax.plot(x[finite], y[finite], label=label)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_ylim(-0.1, 1.05)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("spatial frequency (1/Å)")
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    return fig


def _to_1d(values: np.ndarray | torch.Tensor | Sequence[float], name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def gold_erasure_figure(
    before: np.ndarray | torch.Tensor,
    after: np.ndarray | torch.Tensor,
    centres: np.ndarray | torch.Tensor,
    *,
    diameter_px: float,
    title: str = "gold erasure",
    crops: int = 4,
    clip_std: float = 3.0,
) -> Figure:
    """A tilt image before and after gold erasure, with close-ups of a few beads.

    Parameters
    ----------
    before, after : numpy.ndarray or torch.Tensor
        The tilt image before and after erasure, both of shape `(h, w)`.
    centres : numpy.ndarray or torch.Tensor
        Bead centres ``(y, x)`` in pixels, shape `(k, 2)`; may be empty.
    diameter_px : float
        Bead diameter in pixels. Each bead is circled with the radius that
        :func:`deepdewedge.reconstruct.gold.erase_gold_beads` fills, ``0.6 d + 1.5``.
    title : str
        Title above the figure.
    crops : int
        Number of beads shown in close-up, chosen evenly from the strongest to the weakest
        (``centres`` in their given order); fewer when there are fewer beads.
    clip_std : float
        All panels share the grey levels ``mean ± clip_std * std`` of the erased image, so
        that filled areas compare directly with their surroundings.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, attached to an Agg canvas, not shown or saved.
    """
    images = []
    for name, image in (("before", before), ("after", after)):
        if isinstance(image, torch.Tensor):
            image = image.detach().to("cpu", torch.float64).numpy()
        image = np.asarray(image, dtype=np.float64)
        if image.ndim != 2 or image.size == 0:
            raise ValueError(f"{name} must be a non-empty image of shape (h, w), got {image.shape}")
        images.append(image)
    before, after = images
    if before.shape != after.shape:
        raise ValueError(
            f"before has shape {before.shape} but after has shape {after.shape}; they must match"
        )
    if isinstance(centres, torch.Tensor):
        centres = centres.detach().to("cpu", torch.float64).numpy()
    centres = np.asarray(centres, dtype=np.float64)
    if centres.size == 0:
        centres = centres.reshape(0, 2)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"centres must have shape (k, 2), got {centres.shape}")
    if not np.isfinite(diameter_px) or diameter_px <= 0:
        raise ValueError(f"diameter_px must be positive, got {diameter_px!r}")
    if not np.isfinite(clip_std) or clip_std <= 0:
        raise ValueError(f"clip_std must be positive, got {clip_std!r}")
    if isinstance(crops, bool) or not isinstance(crops, int) or crops < 0:
        raise ValueError(f"crops must be a non-negative integer, got {crops!r}")

    h, w = before.shape
    vmin, vmax = _contrast_limits(after, clip_std)
    radius = 0.6 * diameter_px + 1.5
    shown = np.unique(
        np.linspace(0, len(centres) - 1, min(crops, len(centres))).round().astype(int)
    )
    n = len(shown)
    overview_height = 10.0 * h / (2 * w)
    crop_height = min(10.0 / max(n, 1), 1.6)
    fig = Figure(figsize=(10.0, overview_height + (2 * crop_height if n else 0.0) + 0.6))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    # Two overviews side by side on top; below them one column of crops per bead shown.
    grid = fig.add_gridspec(
        3 if n else 1,
        2 * max(n, 1),
        height_ratios=[overview_height, crop_height, crop_height] if n else None,
    )
    overview = [fig.add_subplot(grid[0, : max(n, 1)]), fig.add_subplot(grid[0, max(n, 1) :])]
    labels = (f"before: {len(centres)} beads, d = {diameter_px:.1f} px", "after")
    for ax, image, label in zip(overview, (before, after), labels, strict=True):
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, aspect="equal")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for number, (y, x) in enumerate(centres):
        ring = Circle((x, y), radius, fill=False, color="tab:red", linewidth=0.6)
        overview[0].add_patch(ring)
        if number in shown:
            overview[0].annotate(
                str(list(shown).index(number) + 1),
                (x + radius, y - radius),
                color="yellow",
                fontsize=7,
            )
    if n:
        size = 2 * max(12, int(np.ceil(2.0 * diameter_px))) + 1
        close = [
            [fig.add_subplot(grid[row, 2 * c : 2 * c + 2]) for c in range(n)] for row in (1, 2)
        ]
        for col, number in enumerate(shown):
            y, x = centres[number]
            y0 = min(max(round(y) - size // 2, 0), max(h - size, 0))
            x0 = min(max(round(x) - size // 2, 0), max(w - size, 0))
            window = (slice(y0, y0 + size), slice(x0, x0 + size))
            for row, image in enumerate((before, after)):
                ax = close[row][col]
                ax.imshow(image[window], cmap="gray", vmin=vmin, vmax=vmax, aspect="equal")
                ax.set_xticks([])
                ax.set_yticks([])
            close[0][col].add_patch(
                Circle((x - x0, y - y0), radius, fill=False, color="tab:red", linewidth=0.8)
            )
            close[0][col].set_title(f"{col + 1}: ({y:.0f}, {x:.0f})", fontsize=8)
        close[0][0].set_ylabel("before", fontsize=8)
        close[1][0].set_ylabel("after", fontsize=8)
    return fig
