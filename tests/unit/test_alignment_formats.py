"""Alignment readers: IMOD .xf, AreTomo .aln, Warp .xml, RELION-5 .star -> one geometry."""

import logging
from pathlib import Path

import numpy as np
import pytest
from alignment_writers import (
    write_aretomo_aln,
    write_aretomo_tlt_txt,
    write_imod_xf,
    write_imod_xtilt,
    write_relion_star,
    write_tlt,
    write_warp_xml,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from messages import assert_one_line

from deepdewedge.io.alignment import alignment_format, read_alignment
from deepdewedge.io.aretomo import read_aretomo_aln, read_aretomo_pre_exposure
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.imod import read_imod_xf
from deepdewedge.io.mrc import InputError
from deepdewedge.io.relion import read_relion_tilt_series_star, read_star
from deepdewedge.io.tilts import read_tilt_angles
from deepdewedge.io.warp import read_warp_xml

FIXTURE = Path(__file__).parents[1] / "data" / "empiar10499"
WARPYLIB = Path("/work/data/warpylib-1.1.2/testdata")
PIXEL = 2.5
GEOMETRY_FIELDS = (
    "tilt_angle_deg",
    "tilt_axis_angle_deg",
    "shift_x_px",
    "shift_y_px",
    "magnification",
    "x_tilt_deg",
    "pre_exposure_e_per_a2",
    "defocus_um",
)


def _assert_same(back, geometry, names, *, where=None, atol=1e-4):
    keep = np.ones(geometry.n_views, dtype=bool) if where is None else where
    assert back.n_views == geometry.n_views
    for name in names:
        np.testing.assert_allclose(
            getattr(back, name)[keep], getattr(geometry, name)[keep], atol=atol, err_msg=name
        )


def _project(geometry, points_px):
    """Raw-image positions `(n_views, p, 2)` of points `(p, 3)` (x, y, z), by the model."""
    x, y, z = (c[None, :] for c in np.asarray(points_px, dtype=np.float64).T)
    alpha, theta, phi = (
        np.deg2rad(a)[:, None]
        for a in (geometry.x_tilt_deg, geometry.tilt_angle_deg, geometry.tilt_axis_angle_deg)
    )
    y_t = np.cos(alpha) * y - np.sin(alpha) * z
    z_t = np.sin(alpha) * y + np.cos(alpha) * z
    u, v = x * np.cos(theta) + z_t * np.sin(theta), y_t
    m = geometry.magnification[:, None]
    return np.stack(
        [
            m * (np.cos(phi) * u - np.sin(phi) * v) + geometry.shift_x_px[:, None],
            m * (np.sin(phi) * u + np.cos(phi) * v) + geometry.shift_y_px[:, None],
        ],
        -1,
    )


# --------------------------------------------------------------------------- strategies
# Values are drawn on each format's own decimal grid so that a round trip is exact to 1e-4.


def _grid(low, high, step):
    return st.integers(int(round(low / step)), int(round(high / step))).map(lambda k: k * step)


@st.composite
def geometries(draw, *, excluded=False, dose=False, defocus=False, x_tilt="none"):
    n = draw(st.integers(1, 10))
    tilt = np.array(draw(st.lists(_grid(-70, 70, 0.01), min_size=n, max_size=n, unique=True)))
    fields = {
        "tilt_angle_deg": tilt,
        "tilt_axis_angle_deg": draw(st.lists(_grid(-179.9, 180, 1e-4), min_size=n, max_size=n)),
        "shift_x_px": draw(st.lists(_grid(-400, 400, 1e-3), min_size=n, max_size=n)),
        "shift_y_px": draw(st.lists(_grid(-400, 400, 1e-3), min_size=n, max_size=n)),
    }
    if excluded and n > 1:
        flags = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        flags[draw(st.integers(0, n - 1))] = False
        fields["excluded"] = flags
    if dose:
        order = draw(st.permutations(range(n)))
        steps = draw(st.lists(_grid(0.01, 5, 0.01), min_size=n, max_size=n))
        pre = np.empty(n)
        pre[list(order)] = np.round(np.concatenate(([0.0], np.cumsum(steps)[:-1])), 2)
        fields["pre_exposure_e_per_a2"] = pre
    if defocus:
        fields["defocus_um"] = draw(st.lists(_grid(0.5, 8, 1e-4), min_size=n, max_size=n))
    if x_tilt == "constant":
        fields["x_tilt_deg"] = np.full(n, draw(_grid(-10, 10, 0.01)))
    elif x_tilt == "per_view":
        fields["x_tilt_deg"] = draw(st.lists(_grid(-10, 10, 0.01), min_size=n, max_size=n))
    return TiltSeriesGeometry(**fields)


@st.composite
def imod_geometries(draw):
    """IMOD stores ``d = -A s`` to 3 decimals: draw ``d`` on that grid and derive ``s``."""
    geometry = draw(geometries(x_tilt="per_view"))
    n = geometry.n_views
    m = np.array(draw(st.lists(_grid(0.95, 1.05, 1e-4), min_size=n, max_size=n)))
    d = np.array(
        draw(
            st.lists(
                st.tuples(_grid(-300, 300, 1e-3), _grid(-300, 300, 1e-3)), min_size=n, max_size=n
            )
        )
    )
    phi = np.deg2rad(geometry.tilt_axis_angle_deg)
    s_x = -m * (np.cos(phi) * d[:, 0] - np.sin(phi) * d[:, 1])
    s_y = -m * (np.sin(phi) * d[:, 0] + np.cos(phi) * d[:, 1])
    return geometry.with_changes(magnification=m, shift_x_px=s_x, shift_y_px=s_y)


# --------------------------------------------------------------------------- round trips

ROUND_TRIP = settings(max_examples=40, deadline=None)


@ROUND_TRIP
@given(geometry=imod_geometries())
def test_imod_round_trip(tmp_path_factory, geometry):
    folder = tmp_path_factory.mktemp("imod")
    xf = write_imod_xf(folder / "ts.xf", geometry)
    tlt = write_tlt(folder / "ts.tlt", geometry.tilt_angle_deg)
    xtilt = write_imod_xtilt(folder / "ts.xtilt", geometry)
    back = read_imod_xf(xf, tilt_angles_deg=read_tilt_angles(tlt), x_tilt_file=xtilt)
    _assert_same(back, geometry, GEOMETRY_FIELDS[:6])
    via = read_alignment(
        xf, n_views=geometry.n_views, pixel_size_angstrom=PIXEL, tilt_angles=tlt, x_tilt_file=xtilt
    )
    _assert_same(via, geometry, GEOMETRY_FIELDS[:6])


@ROUND_TRIP
@given(geometry=geometries(excluded=True, dose=True), zero_based=st.booleans())
def test_aretomo_round_trip(tmp_path_factory, geometry, zero_based):
    folder = tmp_path_factory.mktemp("aretomo")
    aln = write_aretomo_aln(folder / "ts.aln", geometry, zero_based=zero_based)
    write_aretomo_tlt_txt(folder / "ts_TLT.txt", geometry)
    back = read_aretomo_aln(aln, tlt_file=folder / "ts_TLT.txt")
    np.testing.assert_array_equal(back.excluded, geometry.excluded)
    _assert_same(back, geometry, ["tilt_angle_deg", "pre_exposure_e_per_a2"])
    _assert_same(back, geometry, GEOMETRY_FIELDS[1:4], where=~geometry.excluded)
    via = read_alignment(aln, n_views=geometry.n_views, pixel_size_angstrom=PIXEL)
    _assert_same(via, geometry, ["tilt_angle_deg", "pre_exposure_e_per_a2"])


@ROUND_TRIP
@given(
    geometry=geometries(excluded=True, dose=True, defocus=True, x_tilt="constant"),
    inverted=st.booleans(),
)
def test_warp_round_trip(tmp_path_factory, geometry, inverted):
    xml = write_warp_xml(
        tmp_path_factory.mktemp("warp") / "ts.xml", geometry, PIXEL, inverted=inverted
    )
    back = read_warp_xml(xml, pixel_size_angstrom=PIXEL)
    np.testing.assert_array_equal(back.excluded, geometry.excluded)
    _assert_same(back, geometry, GEOMETRY_FIELDS)
    via = read_alignment(xml, n_views=geometry.n_views, pixel_size_angstrom=PIXEL)
    _assert_same(via, geometry, GEOMETRY_FIELDS)


@ROUND_TRIP
@given(
    geometry=geometries(excluded=True, dose=True, defocus=True, x_tilt="per_view"),
    seed=st.integers(0, 99),
)
def test_relion_round_trip(tmp_path_factory, geometry, seed):
    folder = tmp_path_factory.mktemp("relion")
    star = write_relion_star(folder / "TS_01.star", geometry, PIXEL)
    kept = ~geometry.excluded
    alone = read_relion_tilt_series_star(star, pixel_size_angstrom=PIXEL)
    assert alone.n_views == kept.sum() and not alone.excluded.any()
    _assert_same(alone, _kept(geometry), GEOMETRY_FIELDS)
    # The stack in another order: rows find their sections by angle; missing ones are excluded.
    order = np.random.default_rng(seed).permutation(geometry.n_views)
    stack = _subset(geometry, order)
    tlt = write_tlt(folder / "stack.rawtlt", stack.tilt_angle_deg)
    back = read_alignment(star, n_views=stack.n_views, pixel_size_angstrom=PIXEL, tilt_angles=tlt)
    np.testing.assert_array_equal(back.excluded, stack.excluded)
    _assert_same(back, stack, ["tilt_angle_deg"])
    _assert_same(back, stack, GEOMETRY_FIELDS, where=~stack.excluded)


def _subset(geometry, index):
    names = [*GEOMETRY_FIELDS, "excluded"]
    return TiltSeriesGeometry(**{name: getattr(geometry, name)[index] for name in names})


def _kept(geometry):
    return _subset(geometry, ~geometry.excluded)


# --------------------------------------------------------------------------- IMOD conventions


def test_xf_row_gives_the_inverse_rotation_and_shift(tmp_path):
    # A row of EMPIAR-10499's .xf: A rotates by +4.3°, so the tilt axis lies at -4.3° in the raw
    # image; the aligned centre sits at -A⁻¹ d = (27.18, 0.153) px in the raw image.
    xf = tmp_path / "a.xf"
    xf.write_text("   0.9971855  -0.0749783   0.0749783   0.9971855     -27.094      -2.191\n")
    geometry = read_imod_xf(xf, tilt_angles_deg=[-60.01])
    np.testing.assert_allclose(geometry.tilt_axis_angle_deg, [-4.3], atol=1e-4)
    np.testing.assert_allclose(geometry.shift_x_px, [27.182], atol=1e-3)
    np.testing.assert_allclose(geometry.shift_y_px, [0.153], atol=1e-3)
    np.testing.assert_allclose(geometry.magnification, [1.0], atol=1e-6)
    # The map is the inverse of IMOD's: the raw position of aligned point a satisfies A r + d = a.
    a = np.array([[0.9971855, -0.0749783], [0.0749783, 0.9971855]])
    aligned = np.array([10.0, -20.0])
    raw = geometry.raw_position_matrix()[0] @ np.append(aligned, 1.0)
    np.testing.assert_allclose(a @ raw + [-27.094, -2.191], aligned, atol=1e-6)


def test_xf_magnification_and_stretch_warning(tmp_path, caplog):
    xf = tmp_path / "a.xf"
    xf.write_text("1.25 0 0 1.25 0 0\n1.0 0.01 0 1.0 0 0\n")
    with caplog.at_level(logging.WARNING, logger="deepdewedge.io.imod"):
        geometry = read_imod_xf(xf, tilt_angles_deg=[0.0, 3.0])
    np.testing.assert_allclose(geometry.magnification[0], 0.8)
    assert len(caplog.records) == 1 and "views 2 " in caplog.records[0].getMessage()


def test_xtilt_single_value_applies_to_every_view(tmp_path):
    xf = tmp_path / "a.xf"
    xf.write_text("1 0 0 1 0 0\n" * 3)
    (tmp_path / "a.xtilt").write_text(" -2.50\n")
    geometry = read_imod_xf(xf, tilt_angles_deg=[-3, 0, 3], x_tilt_file=tmp_path / "a.xtilt")
    np.testing.assert_allclose(geometry.x_tilt_deg, [-2.5] * 3)


def test_imod_and_warp_from_it_give_one_geometry():
    """Warp imported EMPIAR-10499's .xf into its .xml: both must read to the same geometry."""
    angles = read_tilt_angles(FIXTURE / "00254.tlt")
    imod = read_imod_xf(FIXTURE / "00254_bin2.xf", tilt_angles_deg=angles)
    warp = read_warp_xml(FIXTURE / "00254.xml", pixel_size_angstrom=20.0)
    _assert_same(warp, imod, GEOMETRY_FIELDS[:6], atol=2e-3)
    np.testing.assert_allclose(imod.tilt_axis_angle_deg, -4.3, atol=1e-4)
    assert warp.has_dose and warp.acquisition_order()[0] == 20  # 0° first, dose-symmetric


@pytest.mark.skipif(
    not (WARPYLIB / "xf_import").is_dir(),
    reason=f"{WARPYLIB} absent (test data of warpylib 1.1.2 from PyPI)",
)
def test_imod_and_warp_full_size_example():
    """View 0: DX, DY = -27.094, -2.191 -> shift (27.18, 0.153) px = (271.82, 1.53) Å at 10 Å."""
    folder = WARPYLIB / "xf_import"
    angles = read_tilt_angles(folder / "00254.tlt")
    imod = read_imod_xf(folder / "00254.xf", tilt_angles_deg=angles)
    warp = read_warp_xml(folder / "00254.xml", pixel_size_angstrom=10.0)
    _assert_same(warp, imod, GEOMETRY_FIELDS[:6], atol=2e-3)
    np.testing.assert_allclose(
        [warp.shift_x_px[0] * 10, warp.shift_y_px[0] * 10], [271.82, 1.53], atol=0.01
    )


@pytest.mark.skipif(
    not (WARPYLIB / "TS_1.xml").is_file(),
    reason=f"{WARPYLIB} absent (test data of warpylib 1.1.2 from PyPI)",
)
def test_warp_geometry_projects_like_warp():
    """Points projected by Warp itself (TS_1.star) land where our model puts them.

    Warp's specimen z is ours reversed; its LevelAngleX/Y are a tilt about x and an offset of
    every tilt. What is left is Warp's local grid movement (at most 16 Å here) that we ignore.
    """
    pixel = 0.834
    geometry = read_warp_xml(WARPYLIB / "TS_1.xml", pixel_size_angstrom=pixel)
    blocks = {block.name: block for block in read_star(WARPYLIB / "TS_1.star")}
    points = np.array([[float(v) for v in row] for _, row in blocks["points"].rows])
    mappings = blocks["mappings"]
    index = [
        mappings.columns.index(c)
        for c in ("pointID", "tiltID", "centeredCoordinateXAngst", "centeredCoordinateYAngst")
    ]
    reference = np.zeros((geometry.n_views, len(points), 2))
    for _, row in mappings.rows:
        point, tilt, x, y = (float(row[i]) for i in index)
        reference[int(tilt) - 1, int(point) - 1] = (x, y)
    ours = _project(geometry, points * [1, 1, -1] / pixel) * pixel
    error = np.linalg.norm(ours - reference, axis=-1)
    assert error.max() < 16.0 and np.median(error) < 4.0


# --------------------------------------------------------------------------- Warp conventions

WARP_XML = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<TiltSeries AreAnglesInverted="{inverted}" LevelAngleX="{level_x}" LevelAngleY="0"
 MagnificationCorrection="{mag}">
\t<Angles>-3
0
3</Angles>
\t<Dose>3
0
6</Dose>
\t<UseTilt>True
{use}
True</UseTilt>
\t<AxisAngle>85
85
85</AxisAngle>
\t<AxisOffsetX>10
0
-10</AxisOffsetX>
\t<AxisOffsetY>0
5
0</AxisOffsetY>
\t<CTF>
\t\t<Param Name="Defocus" Value="3.5" />
\t</CTF>
\t<GridCTF Width="1" Height="1" Depth="{depth}" MarginX="0" MarginY="0" MarginZ="0">
{nodes}\t</GridCTF>
\t<GridMovementX Width="1" Height="1" Depth="1" MarginX="0" MarginY="0" MarginZ="0">
\t\t<Node X="0" Y="0" Z="0" Value="{movement}" />
\t</GridMovementX>
</TiltSeries>
"""


def _warp(
    path, *, inverted="False", level_x="0", mag="1, 0, 0, 1", use="True", depth=3, movement="0"
):
    nodes = "".join(f'\t\t<Node X="0" Y="0" Z="{z}" Value="{2 + z}" />\n' for z in range(depth))
    text = WARP_XML.format(
        inverted=inverted,
        level_x=level_x,
        mag=mag,
        use=use,
        depth=depth,
        nodes=nodes,
        movement=movement,
    )
    path.write_bytes(text.encode())
    return path


def test_warp_fields_and_units(tmp_path):
    geometry = read_warp_xml(_warp(tmp_path / "a.xml", use="False"), pixel_size_angstrom=2.0)
    np.testing.assert_allclose(geometry.tilt_angle_deg, [-3, 0, 3])
    np.testing.assert_allclose(geometry.shift_x_px, [5, 0, -5])
    np.testing.assert_allclose(geometry.shift_y_px, [0, 2.5, 0])
    np.testing.assert_array_equal(geometry.excluded, [False, True, False])
    np.testing.assert_allclose(geometry.defocus_um, [2, 3, 4])  # one GridCTF node per tilt
    np.testing.assert_array_equal(geometry.acquisition_order(), [1, 0, 2])
    single = read_warp_xml(_warp(tmp_path / "b.xml", depth=1), pixel_size_angstrom=2.0)
    np.testing.assert_allclose(single.defocus_um, [3.5] * 3)  # else the CTF's Defocus


def test_warp_inverted_angles_are_negated_with_the_same_projections(tmp_path):
    plain = read_warp_xml(_warp(tmp_path / "a.xml", level_x="2"), pixel_size_angstrom=2.0)
    inverted = read_warp_xml(
        _warp(tmp_path / "b.xml", inverted="True", level_x="2"), pixel_size_angstrom=2.0
    )
    np.testing.assert_allclose(inverted.tilt_angle_deg, -plain.tilt_angle_deg)
    np.testing.assert_allclose(inverted.x_tilt_deg, -plain.x_tilt_deg)
    np.testing.assert_allclose(plain.x_tilt_deg, [-2] * 3)
    # Same image positions; the tomogram is mirrored in z.
    points = np.random.default_rng(0).uniform(-100, 100, (20, 3))
    np.testing.assert_allclose(
        _project(inverted, points * [1, 1, -1]), _project(plain, points), atol=1e-9
    )


def test_warp_warns_about_what_it_ignores(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="deepdewedge.io.warp"):
        read_warp_xml(
            _warp(tmp_path / "a.xml", movement="1.5", mag="1.01, 0, 0, 0.99"),
            pixel_size_angstrom=1.0,
        )
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "GridMovementX" in messages and "MagnificationCorrection" in messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepdewedge.io.warp"):
        read_warp_xml(_warp(tmp_path / "b.xml"), pixel_size_angstrom=1.0)
    assert not caplog.records


def test_stack_of_kept_views_only(tmp_path):
    xml = _warp(tmp_path / "a.xml", use="False")
    geometry = read_alignment(xml, n_views=2, pixel_size_angstrom=2.0)
    np.testing.assert_allclose(geometry.tilt_angle_deg, [-3, 3])
    assert not geometry.excluded.any()


# --------------------------------------------------------------------------- AreTomo conventions

ALN_HEADER = """# AreTomo Alignment / Priims bprmMn
# RawSize = 1024 1024 5
# NumPatches = {patches}
{darks}# AlphaOffset =     0.00
# BetaOffset =     0.00
# Thickness = 300
# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
"""


def _aln(path, darks, secs, *, local=False):
    dark_lines = "".join(f"# DarkFrame =  {i:4d} {s:4d} {t:8.2f}\n" for i, s, t in darks)
    rows = "".join(
        f"{sec:5d}  {84.5 + k:9.4f}  {1.0:9.5f}  {10.0 * k:9.3f}  {-2.0 * k:9.3f}  "
        f"{1.0:7.2f}  {1.0:7.2f}  {1.0:7.2f}  {0.0:7.2f}  {-3.0 + 3 * k:8.2f}\n"
        for k, sec in enumerate(secs)
    )
    local_rows = (
        "# Local Alignment\n   0   0  -100.00    100.00      1.00     -1.00   1.0\n"
        if local
        else ""
    )
    path.write_text(
        ALN_HEADER.format(patches=1 if local else 0, darks=dark_lines) + rows + local_rows
    )
    return path


@pytest.mark.parametrize(
    ("darks", "secs"),
    [
        ([(0, 1, -6.0), (4, 5, 9.0)], [2, 3, 4]),  # AreTomo3: sections from 1
        ([(0, 0, -6.0), (4, 4, 9.0)], [1, 2, 3]),  # AreTomo2: sections from 0
        ([(0, 0, -6.0), (4, 4, 9.0)], [0, 1, 2]),  # early AreTomo3: rows renumbered
    ],
)
def test_aretomo_dark_frames_are_excluded_views(tmp_path, darks, secs):
    geometry = read_aretomo_aln(_aln(tmp_path / "a.aln", darks, secs))
    np.testing.assert_array_equal(geometry.excluded, [True, False, False, False, True])
    np.testing.assert_allclose(geometry.tilt_angle_deg, [-6, -3, 0, 3, 9])
    np.testing.assert_allclose(geometry.tilt_axis_angle_deg[1:4], [84.5, 85.5, 86.5])
    np.testing.assert_allclose(geometry.shift_x_px[1:4], [0, 10, 20])
    np.testing.assert_allclose(geometry.shift_y_px[1:4], [0, -2, -4])


def test_aretomo_rows_agree_with_aretomo_own_xf_export(tmp_path):
    """AreTomo writes for a row the .xf A = R(-ROT), d = A (-TX, -TY); both read the same."""
    aln = _aln(tmp_path / "a.aln", [], [1, 2, 3, 4, 5])
    geometry = read_aretomo_aln(aln)
    lines = []
    for phi, tx, ty in zip(
        geometry.tilt_axis_angle_deg, geometry.shift_x_px, geometry.shift_y_px, strict=True
    ):
        r = np.deg2rad(-phi)
        a = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
        d = a @ [-tx, -ty]
        lines.append(" ".join(f"{v:.7f}" for v in [*a.reshape(-1), *d]))
    (tmp_path / "a.xf").write_text("\n".join(lines))
    imod = read_imod_xf(tmp_path / "a.xf", tilt_angles_deg=geometry.tilt_angle_deg)
    _assert_same(imod, geometry, GEOMETRY_FIELDS[:6], atol=1e-5)


def test_aretomo_local_alignment_ignored_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="deepdewedge.io.aretomo"):
        geometry = read_aretomo_aln(_aln(tmp_path / "a.aln", [], [1, 2, 3, 4, 5], local=True))
    assert geometry.n_views == 5
    assert len(caplog.records) == 1 and "local" in caplog.records[0].getMessage()


def test_aretomo3_tlt_txt_gives_pre_exposure(tmp_path):
    aln = _aln(tmp_path / "ts.aln", [], [1, 2, 3, 4, 5])
    # tilt, acquisition index (from 1), dose of that image: dose-symmetric from 0°
    (tmp_path / "ts_TLT.txt").write_text(
        "   -6.00     5      3.00\n   -3.00     2      3.00\n    0.00     1      3.00\n"
        "    3.00     3      3.00\n    6.00     4      3.00\n"
    )
    pre = read_aretomo_pre_exposure(tmp_path / "ts_TLT.txt", n_views=5)
    np.testing.assert_allclose(pre, [12, 3, 0, 6, 9])
    geometry = read_alignment(aln, n_views=5, pixel_size_angstrom=1.0)  # found next to the .aln
    np.testing.assert_allclose(geometry.pre_exposure_e_per_a2, pre)
    np.testing.assert_array_equal(geometry.acquisition_order(), [2, 1, 3, 4, 0])


def test_aretomo_tlt_txt_without_dose(tmp_path, caplog):
    aln = _aln(tmp_path / "ts.aln", [], [1, 2, 3, 4, 5])
    tlt_txt = tmp_path / "ts_TLT.txt"
    tlt_txt.write_text("".join(f"{t:8.2f}  {k + 1:4d}\n" for k, t in enumerate(range(-6, 7, 3))))
    with pytest.raises(InputError) as err:
        read_aretomo_aln(aln, tlt_file=tlt_txt)
    assert "dose" in assert_one_line(err, tlt_txt)
    with caplog.at_level(logging.WARNING, logger="deepdewedge.io.alignment"):
        geometry = read_alignment(aln, n_views=5, pixel_size_angstrom=1.0)
    assert not geometry.has_dose and "dose" in caplog.records[0].getMessage()


# --------------------------------------------------------------------------- RELION-5 conventions

STAR = """
# version 50001

data_TS_01

loop_
_rlnMicrographName #1
_rlnTomoNominalStageTiltAngle #2
_rlnMicrographPreExposure #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnTomoXTilt #6
_rlnTomoYTilt #7
_rlnTomoZRot #8
_rlnTomoXShiftAngst #9
_rlnTomoYShiftAngst #10
'frames/TS 01_002.mrc'   3.0   6.0  30000  32000  0.5   3.2  85.0   20.0  -10.0  # a comment
"frames/TS 01_000.mrc"  -3.0   3.0  31000  31000  0.5  -2.8  85.0   10.0    0.0
frames/TS_01_001.mrc     0.0   0.0  29000  29000  0.5   0.2  85.0    0.0   10.0
"""


def test_relion_fields_units_and_acquisition_order(tmp_path):
    star = tmp_path / "TS_01.star"
    star.write_text(STAR)
    geometry = read_relion_tilt_series_star(star, pixel_size_angstrom=2.0)
    np.testing.assert_allclose(geometry.tilt_angle_deg, [3.2, -2.8, 0.2])
    np.testing.assert_allclose(geometry.x_tilt_deg, [0.5] * 3)
    np.testing.assert_allclose(geometry.shift_x_px, [10, 5, 0])
    np.testing.assert_allclose(geometry.defocus_um, [3.1, 3.1, 2.9])
    np.testing.assert_array_equal(geometry.acquisition_order(), [2, 1, 0])


def test_relion_rows_matched_to_stack_by_nominal_angle(tmp_path):
    star = tmp_path / "TS_01.star"
    star.write_text(STAR)
    stack = np.array([-6.0, -3.0, 0.0, 3.0, 6.0])  # two views excluded in RELION
    geometry = read_relion_tilt_series_star(
        star, pixel_size_angstrom=2.0, stack_tilt_angles_deg=stack
    )
    np.testing.assert_array_equal(geometry.excluded, [True, False, False, False, True])
    np.testing.assert_allclose(geometry.tilt_angle_deg, [-6, -2.8, 0.2, 3.2, 6])  # refined angles
    np.testing.assert_allclose(geometry.pre_exposure_e_per_a2[1:4], [3, 0, 6])


def test_star_parser_quotes_comments_and_blocks(tmp_path):
    path = tmp_path / "x.star"
    path.write_text(
        "# c\ndata_a\n_rlnKey 'two words' # c\nloop_\n_x #1\n_y #2\n1 \"b c\"\n\n"
        "data_b\nloop_\n_z\n3\n"
    )
    a, b = read_star(path)
    assert a.values == {"rlnKey": "two words"} and a.rows[0][1] == ["1", "b c"]
    assert b.name == "b" and b.columns == ["z"] and b.rows == [(12, ["3"])]


# --------------------------------------------------------------------------- format detection


@pytest.mark.parametrize("kind", ["imod", "aretomo", "warp", "relion"])
def test_format_recognised_from_content(tmp_path, kind):
    geometry = TiltSeriesGeometry(tilt_angle_deg=[-3.0, 0.0, 3.0], tilt_axis_angle_deg=[85.0] * 3)
    path = tmp_path / "alignment.txt"  # no telling extension
    writers = {
        "imod": lambda p: write_imod_xf(p, geometry),
        "aretomo": lambda p: write_aretomo_aln(p, geometry),
        "warp": lambda p: write_warp_xml(p, geometry, PIXEL),
        "relion": lambda p: write_relion_star(p, geometry, PIXEL),
    }
    assert alignment_format(writers[kind](path)) == kind


def test_format_falls_back_to_extension_and_else_is_unknown(tmp_path):
    (tmp_path / "bad.xf").write_text("1 0 0\n")
    assert alignment_format(tmp_path / "bad.xf") == "imod"
    (tmp_path / "angles.tlt").write_text("-3\n0\n3\n")
    assert alignment_format(tmp_path / "angles.tlt") is None
    (tmp_path / "other.xml").write_text("<Movie></Movie>")
    assert alignment_format(tmp_path / "other.xml") is None


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path):
    """(alignment path, read_alignment keywords, expected text) for every bad case."""
    tlt = write_tlt(tmp_path / "ts.tlt", [-3.0, 0.0, 3.0])
    far = write_tlt(tmp_path / "far.tlt", [-3.0, 1.0, 3.0])
    good = TiltSeriesGeometry(tilt_angle_deg=[-3.0, 0.0, 3.0], tilt_axis_angle_deg=[85.0] * 3)
    xml = write_warp_xml(tmp_path / "ts.xml", good, PIXEL)
    aln = write_aretomo_aln(tmp_path / "ts.aln", good)
    xf = write_imod_xf(tmp_path / "ts.xf", good)
    star = write_relion_star(tmp_path / "ts.star", good, PIXEL)
    (tmp_path / "row.xf").write_text("1 0 0 1 0 0\n1 0 0 1 0 0\n1 0 0 1 0\n")
    rows = aln.read_text().splitlines()
    rows[8] = rows[8].replace("  1.00000  ", "  ")  # the second row, line 9, loses GMAG
    (tmp_path / "row.aln").write_text("\n".join(rows))
    (tmp_path / "word.xml").write_text(
        xml.read_text(encoding="utf-8-sig").replace("<Angles>-3", "<Angles>abc")
    )
    (tmp_path / "broken.xml").write_text('<?xml version="1.0"?>\n<TiltSeries>\n<Angles>1</Dose>\n')
    (tmp_path / "nozrot.star").write_text(star.read_text().replace("_rlnTomoZRot", "_rlnTomoZRotX"))
    (tmp_path / "tomograms.star").write_text(
        "data_global\nloop_\n_rlnTomoName\n_rlnTomoTiltSeriesStarFile\nTS_01 ts.star\n"
    )
    (tmp_path / "notes.txt").write_text("just some notes\n")
    (tmp_path / "small.aln").write_text(aln.read_text().replace("4096 4096 3", "4096 4096 2"))
    n3 = {"n_views": 3, "pixel_size_angstrom": PIXEL}
    return [
        (xml, {"n_views": 4, "pixel_size_angstrom": PIXEL}, "3 views but the stack has 4"),
        (aln, {**n3, "n_views": 5}, "3 views but the stack has 5"),
        (tmp_path / "row.xf", {**n3, "tilt_angles": tlt}, "line 3"),
        (tmp_path / "row.aln", n3, "line 9"),
        (tmp_path / "small.aln", n3, "SEC 3 is outside the 2 sections"),
        (tmp_path / "word.xml", n3, "line 3"),
        (tmp_path / "broken.xml", n3, "line 3"),
        (xml, {**n3, "tilt_angles": far}, "view 2"),
        (aln, {**n3, "tilt_angles": far}, str(far)),
        (xf, n3, ".tlt"),
        (
            xf,
            {**n3, "tilt_angles": write_tlt(tmp_path / "two.tlt", [0.0, 3.0])},
            "3 transforms for 2",
        ),
        (aln, {**n3, "x_tilt_file": tmp_path / "ts.xtilt"}, "IMOD .xf"),
        (tmp_path / "notes.txt", n3, "RELION-5"),
        (tmp_path / "nozrot.star", n3, "_rlnTomoZRot"),
        (tmp_path / "tomograms.star", n3, "_rlnTomoTiltSeriesStarFile"),
        (star, {**n3, "tilt_angles": write_tlt(tmp_path / "off.tlt", [-3.0, 0.0, 13.0])}, "view"),
    ]


def test_every_bad_input_is_one_line_naming_the_file(tmp_path):
    for path, keywords, needle in _bad_inputs(tmp_path):
        with pytest.raises(InputError) as err:
            read_alignment(path, **keywords)
        message = str(err.value)
        named = keywords.get("x_tilt_file") or path
        assert_one_line(err, named)
        assert needle in message, (path.name, message)


def test_disagreeing_angles_name_both_files(tmp_path):
    geometry = TiltSeriesGeometry(tilt_angle_deg=[-3.0, 0.0, 3.0])
    xml = write_warp_xml(tmp_path / "ts.xml", geometry, PIXEL)
    far = write_tlt(tmp_path / "far.tlt", [-3.0, 0.0, 4.0])
    with pytest.raises(InputError) as err:
        read_alignment(xml, n_views=3, pixel_size_angstrom=PIXEL, tilt_angles=far)
    message = assert_one_line(err, xml)
    assert str(far) in message and "view 3" in message


def test_inverted_angles_hint_in_the_message(tmp_path):
    xml = _warp(tmp_path / "a.xml", inverted="True")
    tlt = write_tlt(tmp_path / "a.tlt", [-3.0, 0.0, 3.0])
    with pytest.raises(InputError) as err:
        read_alignment(xml, n_views=3, pixel_size_angstrom=1.0, tilt_angles=tlt)
    assert "opposite signs" in assert_one_line(err, xml)
