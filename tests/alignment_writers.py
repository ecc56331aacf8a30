"""Write one known tilt-series geometry as IMOD, AreTomo, Warp and RELION-5 alignment files.

Every writer lays its file out as the program itself does (column widths, decimals, headers),
so the readers are tested on files like the real ones. Numbers therefore carry the precision
of each format: IMOD ``4f12.7, 2f12.3`` (and ``f7.2`` angles), AreTomo ``%9.4f`` rotations,
``%9.3f`` shifts and ``%8.2f`` angles, Warp single-precision numbers, RELION ``%12.6f``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepdewedge.io.geometry import TiltSeriesGeometry

__all__ = [
    "write_aretomo_aln",
    "write_aretomo_tlt_txt",
    "write_imod_xf",
    "write_imod_xtilt",
    "write_relion_star",
    "write_tlt",
    "write_warp_xml",
]


def _rotation(phi_deg: np.ndarray) -> np.ndarray:
    phi = np.deg2rad(phi_deg)
    c, s = np.cos(phi), np.sin(phi)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def write_imod_xf(path: Path, geometry: TiltSeriesGeometry) -> Path:
    """IMOD ``.xf``: ``A = (m R(φ))⁻¹``, ``d = -A s``, one ``4f12.7, 2f12.3`` line per view."""
    matrices = np.linalg.inv(
        geometry.magnification[:, None, None] * _rotation(geometry.tilt_axis_angle_deg)
    )
    shifts = np.stack([geometry.shift_x_px, geometry.shift_y_px], -1)
    d = -np.einsum("nij,nj->ni", matrices, shifts)
    lines = [
        "".join(f"{v:12.7f}" for v in a.reshape(-1)) + "".join(f"{v:12.3f}" for v in t)
        for a, t in zip(matrices, d, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tlt(path: Path, angles_deg: np.ndarray) -> Path:
    """IMOD ``.tlt``: one ``f7.2`` angle per line."""
    path.write_text("".join(f"{a:7.2f}\n" for a in np.asarray(angles_deg)))
    return path


def write_imod_xtilt(path: Path, geometry: TiltSeriesGeometry) -> Path:
    """IMOD ``.xtilt``: one ``f7.2`` x-axis tilt per line."""
    return write_tlt(path, geometry.x_tilt_deg)


def write_aretomo_aln(
    path: Path,
    geometry: TiltSeriesGeometry,
    *,
    image_size: tuple[int, int] = (4096, 4096),
    n_patches: int = 0,
    zero_based: bool = False,
) -> Path:
    """AreTomo ``.aln``: excluded views as ``DarkFrame`` lines, the others as rows in tilt order.

    ``zero_based`` numbers sections from 0 as AreTomo2 does; AreTomo3 numbers them from 1.
    """
    base = 0 if zero_based else 1
    by_tilt = np.argsort(geometry.tilt_angle_deg, kind="stable")
    kept = [int(i) for i in by_tilt if not geometry.excluded[i]]
    lines = [
        "# AreTomo Alignment / Priims bprmMn",
        f"# RawSize = {image_size[0]} {image_size[1]} {geometry.n_views}",
        f"# NumPatches = {n_patches}",
    ]
    for position, i in enumerate(by_tilt):
        if geometry.excluded[i]:
            tilt = geometry.tilt_angle_deg[i]
            lines.append(f"# DarkFrame =  {position:4d} {i + base:4d} {tilt:8.2f}")
    lines += [
        f"# AlphaOffset = {0.0:8.2f}",
        f"# BetaOffset = {0.0:8.2f}",
        "# Thickness = 1000",
        "# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE"
        "     TILT",
    ]
    for i in kept:
        lines.append(
            f"{i + base:5d}  {geometry.tilt_axis_angle_deg[i]:9.4f}  {1.0:9.5f}  "
            f"{geometry.shift_x_px[i]:9.3f}  {geometry.shift_y_px[i]:9.3f}  {1.0:7.2f}  "
            f"{1.0:7.2f}  {1.0:7.2f}  {0.0:7.2f}  {geometry.tilt_angle_deg[i]:8.2f}"
        )
    if n_patches:
        lines.append("# Local Alignment")
        for t in range(len(kept)):
            for p in range(n_patches):
                x, y = 100.0 * p, -50.0
                lines.append(
                    f"{t:4d} {p:3d} {x:8.2f}  {y:8.2f}  {0.5:8.2f}  {-0.5:8.2f}  {1.0:4.1f}"
                )
    path.write_text("\n".join(lines) + "\n")
    return path


def write_aretomo_tlt_txt(path: Path, geometry: TiltSeriesGeometry) -> Path:
    """AreTomo3 ``_TLT.txt``: ``tilt acquisition-index dose`` per section (``%8.2f  %4d  %8.2f``).

    Each image's dose is the step to the next pre-exposure in acquisition order (the last
    image repeats the one before), so the pre-exposure is recovered exactly.
    """
    order = np.argsort(geometry.pre_exposure_e_per_a2, kind="stable")
    steps = np.diff(geometry.pre_exposure_e_per_a2[order])
    dose = np.empty(geometry.n_views)
    dose[order] = np.concatenate([steps, steps[-1:] if steps.size else [0.0]])
    position = np.empty(geometry.n_views, dtype=int)
    position[order] = np.arange(geometry.n_views)
    lines = [
        f"{geometry.tilt_angle_deg[i]:8.2f}  {position[i] + 1:4d}  {dose[i]:8.2f}"
        for i in range(geometry.n_views)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cs(value: float) -> str:
    """A number as Warp (C#) writes a float: shortest single-precision form, no trailing .0."""
    return np.format_float_positional(np.float32(value), trim="-")


def _grid(tag: str, values: list[float] | None = None) -> str:
    """A Warp grid element: one node, or one node per tilt along Z."""
    values = [0.0] if values is None else values
    nodes = "".join(
        f'\t\t<Node X="0" Y="0" Z="{z}" Value="{_cs(v)}" />\n' for z, v in enumerate(values)
    )
    return (
        f'\t<{tag} Width="1" Height="1" Depth="{len(values)}" MarginX="0" MarginY="0" '
        f'MarginZ="0">\n{nodes}\t</{tag}>\n'
    )


def write_warp_xml(
    path: Path,
    geometry: TiltSeriesGeometry,
    pixel_size_angstrom: float,
    *,
    inverted: bool = False,
) -> Path:
    """Warp tilt-series ``.xml`` (UTF-8 with BOM, tab-indented, one entry per line, LF).

    The x tilt, which Warp holds once as ``LevelAngleX``, must be the same on every view.
    ``inverted`` writes ``AreAnglesInverted="True"`` with the angles negated.
    """
    if np.ptp(geometry.x_tilt_deg) > 0:
        raise ValueError("Warp holds one x tilt (LevelAngleX) for all views")
    sign = -1.0 if inverted else 1.0
    n = geometry.n_views
    dose = np.nan_to_num(geometry.pre_exposure_e_per_a2)

    def column(tag: str, values) -> str:
        return f"\t<{tag}>" + "\n".join(values) + f"</{tag}>\n"

    defocus = geometry.defocus_um if geometry.has_defocus else np.zeros(n)
    text = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<TiltSeries DataDirectory="" AreAnglesInverted="{inverted}" PlaneNormal="0, 0, 1" '
        f'LevelAngleX="{_cs(sign * -geometry.x_tilt_deg[0])}" LevelAngleY="0" Bfactor="0" '
        'Weight="1" MagnificationCorrection="1, 0, 0, 1" UnselectFilter="False" '
        'UnselectManual="" CTFResolutionEstimate="0">\n'
        + column("Angles", [_cs(sign * a) for a in geometry.tilt_angle_deg])
        + column("Dose", [_cs(d) for d in dose])
        + column("UseTilt", [str(not e) for e in geometry.excluded])
        + column("AxisAngle", [_cs(a) for a in geometry.tilt_axis_angle_deg])
        + column("AxisOffsetX", [_cs(s * pixel_size_angstrom) for s in geometry.shift_x_px])
        + column("AxisOffsetY", [_cs(s * pixel_size_angstrom) for s in geometry.shift_y_px])
        + column("MoviePath", [f"../frames/TS_{i:03d}.tif" for i in range(n)])
        + column("FOVFraction", ["1"] * n)
        + "\t<CTF>\n"
        f'\t\t<Param Name="PixelSize" Value="{_cs(pixel_size_angstrom)}" />\n'
        f'\t\t<Param Name="Defocus" Value="{_cs(float(np.median(defocus)))}" />\n'
        '\t\t<Param Name="Voltage" Value="300" />\n'
        "\t</CTF>\n"
        + _grid("GridCTF", list(defocus))
        + "".join(
            _grid(tag)
            for tag in ("GridMovementX", "GridMovementY", "GridAngleX", "GridAngleY", "GridAngleZ")
        )
        + "</TiltSeries>\n"
    )
    path.write_bytes("\ufeff".encode() + text.encode())
    return path


def write_relion_star(
    path: Path, geometry: TiltSeriesGeometry, pixel_size_angstrom: float, *, name: str = "TS_01"
) -> Path:
    """RELION-5 tilt-series STAR file: one row per view kept, excluded views dropped."""
    columns = {
        "rlnMicrographMovieName": [f"frames/{name}_{i:03d}.eer" for i in range(geometry.n_views)],
        "rlnTomoNominalStageTiltAngle": geometry.tilt_angle_deg,
        "rlnTomoNominalTiltAxisAngle": np.full(geometry.n_views, 85.0),
        "rlnMicrographName": [
            f"MotionCorr/job002/frames/{name}_{i:03d}.mrc" for i in range(geometry.n_views)
        ],
    }
    if geometry.has_dose:
        columns["rlnMicrographPreExposure"] = geometry.pre_exposure_e_per_a2
    if geometry.has_defocus:
        columns["rlnDefocusU"] = geometry.defocus_um * 1e4
        columns["rlnDefocusV"] = geometry.defocus_um * 1e4
        columns["rlnDefocusAngle"] = np.full(geometry.n_views, 45.0)
    columns |= {
        "rlnTomoXTilt": geometry.x_tilt_deg,
        "rlnTomoYTilt": geometry.tilt_angle_deg,
        "rlnTomoZRot": geometry.tilt_axis_angle_deg,
        "rlnTomoXShiftAngst": geometry.shift_x_px * pixel_size_angstrom,
        "rlnTomoYShiftAngst": geometry.shift_y_px * pixel_size_angstrom,
    }
    lines = ["", "# version 50001", "", f"data_{name}", "", "loop_ "]
    lines += [f"_{label} #{k} " for k, label in enumerate(columns, start=1)]
    for i in np.flatnonzero(~geometry.excluded):
        values = (v[i] for v in columns.values())
        lines.append(" ".join(v if isinstance(v, str) else f"{v:12.6f}" for v in values) + " ")
    path.write_text("\n".join(lines) + "\n\n")
    return path
