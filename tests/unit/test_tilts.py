from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from messages import assert_one_line

from deepdewedge.io.mrc import InputError
from deepdewedge.io.tilts import (
    MdocTilts,
    acquisition_order_from_angles,
    read_defocus,
    read_mdoc,
    read_tilt_angles,
)

ANGLES_60 = np.arange(-60.0, 61.0, 3.0)


def _write(path, text, *, crlf=False):
    data = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes(data.encode())
    return path


# --------------------------------------------------------------------------- tilt angles


def test_tilt_angles_round_trip_with_crlf_and_blank_lines(tmp_path):
    angles = np.array([-60.0, -57.02, 0.0, 3.5, 60.0])
    text = "\n".join(f"  {a:.2f} " for a in angles[:2]) + "\n\n" + "\n".join(map(str, angles[2:]))
    for name in ("a.tlt", "a.rawtlt"):
        back = read_tilt_angles(_write(tmp_path / name, text + "\n\n", crlf=True))
        assert back.dtype == np.float64 and back.shape == (5,)
        np.testing.assert_allclose(back, angles)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "no such file"),
        ("directory", "directory"),
        ("empty", "empty"),
        ("blank", "empty"),
        ("word", "line 3"),
        ("two", "line 2"),
        ("range", "line 2"),
        ("nan", "line 1"),
        ("binary", "not a text file"),
    ],
)
def test_tilt_angle_errors_are_one_line(tmp_path, kind, needle):
    path = tmp_path / f"{kind}.tlt"
    contents = {
        "empty": b"",
        "blank": b"\n  \n",
        "word": b"-3\n0\nabc\n",
        "two": b"-3\n0 1\n",
        "range": b"-3\n3500\n",
        "nan": b"nan\n",
        "binary": b"\xff\xfe\x00\x81" * 10,
    }
    if kind == "directory":
        path.mkdir()
    elif kind != "missing":
        path.write_bytes(contents[kind])
    with pytest.raises(InputError) as err:
        read_tilt_angles(path)
    assert needle in assert_one_line(err, path)


# --------------------------------------------------------------------------- acquisition order


def _sequence(positions):
    """Stack indices in acquisition order, from each tilt's position."""
    return np.argsort(positions)


def test_sequential_order_is_ascending_angle():
    angles = np.array([10.0, -20.0, 0.0, 30.0, -10.0])
    positions = acquisition_order_from_angles(angles)
    assert positions.dtype == np.int64
    np.testing.assert_array_equal(positions, [3, 0, 2, 4, 1])
    np.testing.assert_array_equal(angles[_sequence(positions)], np.sort(angles))


def test_dose_symmetric_hagen_sequence():
    positions = acquisition_order_from_angles(ANGLES_60, scheme="dose-symmetric")
    assert sorted(positions) == list(range(41))
    expected = [0.0]
    for k in range(1, 20, 2):
        expected += [3.0 * k, 3.0 * (k + 1), -3.0 * k, -3.0 * (k + 1)]
    assert expected[:9] == [0, 3, 6, -3, -6, 9, 12, -9, -12]
    assert expected[-4:] == [57, 60, -57, -60]
    np.testing.assert_array_equal(ANGLES_60[_sequence(positions)], expected)


def test_dose_symmetric_does_not_depend_on_stack_order():
    rng = np.random.default_rng(0)
    shuffle = rng.permutation(41)
    positions = acquisition_order_from_angles(ANGLES_60[shuffle], scheme="dose-symmetric")
    reference = acquisition_order_from_angles(ANGLES_60, scheme="dose-symmetric")
    np.testing.assert_array_equal(positions, reference[shuffle])


def test_dose_symmetric_options():
    angles = np.arange(-9.0, 31.0, 3.0)  # -9 .. 30: the negative side runs out first
    positions = acquisition_order_from_angles(
        angles, scheme="dose-symmetric", start_deg=0.4, group_size=1, positive_first=False
    )
    seq = angles[_sequence(positions)]
    np.testing.assert_array_equal(seq[:7], [0, -3, 3, -6, 6, -9, 9])
    np.testing.assert_array_equal(seq[7:], np.arange(12.0, 31.0, 3.0))
    lamella = acquisition_order_from_angles(angles, scheme="dose-symmetric", start_deg=10.0)
    np.testing.assert_array_equal(angles[_sequence(lamella)][:5], [9, 12, 15, 6, 3])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-70, 70), min_size=1, max_size=60),
    st.sampled_from(["sequential", "dose-symmetric"]),
    st.floats(-70, 70),
    st.integers(1, 4),
)
def test_order_is_always_a_permutation(angles, scheme, start, group):
    positions = acquisition_order_from_angles(
        np.array(angles), scheme=scheme, start_deg=start, group_size=group
    )
    assert sorted(positions) == list(range(len(angles)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"angles_deg": []},
        {"angles_deg": [0.0, np.nan]},
        {"angles_deg": [0.0], "scheme": "bidirectional"},
        {"angles_deg": [0.0], "scheme": "dose-symmetric", "group_size": 0},
    ],
)
def test_order_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        acquisition_order_from_angles(**kwargs)


# --------------------------------------------------------------------------- mdoc

HEADER = """PixelSpacing = 2.125
Voltage = 300
ImageFile = TS_01.mrc
ImageSize = 4096 4096
DataMode = 1

[T = SerialEM: Digitized on Krios                     09-Jun-22  14:01:55    ]

[T =     Tilt axis angle = 85.3, binning = 1  spot = 8  camera = 0]

"""


def _section(z, angle, *, time=None, defocus=None, dose=3.0, prior=None, shuffle=False):
    lines = [
        f"TiltAngle = {angle:.4f}",
        "StagePosition = 12.5 -3.25",
        "Magnification = 64000",
        f"ExposureDose = {dose}",
        "PixelSpacing = 2.125",
        f"SubFramePath = X:\\frames\\TS_01_{z:03d}.tif",
        "ImageShift = 0.01 -0.02",
    ]
    if defocus is not None:
        lines += [f"Defocus = {defocus:.3f}", "TargetDefocus = -3.5"]
    if prior is not None:
        lines.append(f"PriorRecordDose = {prior}")
    if time is not None:
        lines.append(f"DateTime = {time:%d-%b-%y  %H:%M:%S}")
    if shuffle:
        lines.reverse()
    return f"[ZValue = {z}]\n" + "\n".join(lines) + "\n\n"


def test_mdoc_stack_sorted_by_angle_acquired_dose_symmetric(tmp_path):
    # The stack is in angle order (ZValue 0 = -60°) but was acquired dose-symmetrically:
    # DateTime, not ZValue, gives the acquisition order.
    truth = acquisition_order_from_angles(ANGLES_60, scheme="dose-symmetric")
    start = datetime(2022, 6, 9, 14, 3, 12)
    times = [start + timedelta(seconds=40 * int(p)) for p in truth]
    defocus = -(3.0 + 0.01 * np.arange(41))
    rows = enumerate(zip(ANGLES_60, times, defocus, truth, strict=True))
    text = HEADER + "".join(  # the key order varies between sections
        _section(z, a, time=t, defocus=d, prior=3.0 * p, shuffle=bool(z % 2))
        for z, (a, t, d, p) in rows
    )
    path = _write(tmp_path / "TS_01.mrc.mdoc", text, crlf=True)
    mdoc = read_mdoc(path)
    assert isinstance(mdoc, MdocTilts)
    np.testing.assert_allclose(mdoc.angles_deg, ANGLES_60)
    np.testing.assert_array_equal(mdoc.acquisition_order, truth)
    np.testing.assert_allclose(mdoc.dose_e_per_a2, 3.0)
    np.testing.assert_allclose(mdoc.prior_dose_e_per_a2, 3.0 * truth)
    np.testing.assert_allclose(mdoc.defocus_um, -defocus)  # positive = underfocus
    assert mdoc.pixel_size_angstrom == pytest.approx(2.125)
    assert mdoc.voltage_kv == pytest.approx(300.0)
    with pytest.raises(ValueError):
        mdoc.angles_deg[0] = 1.0  # frozen record, read-only arrays


def test_mdoc_without_datetime_uses_section_order(tmp_path):
    angles = np.array([0.0, 3.0, -3.0, 6.0, -6.0])
    # Sections appear in the file as acquired; ZValue says where each image is in the stack.
    z_of_section = [2, 3, 1, 4, 0]
    text = "".join(_section(z, angles[z], dose=0.0) for z in z_of_section)
    mdoc = read_mdoc(_write(tmp_path / "a.mdoc", text))
    np.testing.assert_allclose(mdoc.angles_deg, angles)
    np.testing.assert_array_equal(mdoc.acquisition_order, [4, 2, 0, 1, 3])
    assert np.isnan(mdoc.dose_e_per_a2).all()  # ExposureDose 0: dose not calibrated
    assert np.isnan(mdoc.prior_dose_e_per_a2).all()
    assert mdoc.defocus_um is None and mdoc.voltage_kv is None
    assert mdoc.pixel_size_angstrom == pytest.approx(2.125)  # from the sections


def test_mdoc_prior_dose_from_exposure_dose_and_target_defocus(tmp_path):
    angles = [0.0, 3.0, -3.0]
    text = "".join(_section(z, a, dose=2.5) for z, a in enumerate(angles))
    text = text.replace("TiltAngle", "TargetDefocus = -4.0\nTiltAngle")
    mdoc = read_mdoc(_write(tmp_path / "a.mdoc", text))
    np.testing.assert_array_equal(mdoc.acquisition_order, [0, 1, 2])
    np.testing.assert_allclose(mdoc.prior_dose_e_per_a2, [0.0, 2.5, 5.0])
    np.testing.assert_allclose(mdoc.defocus_um, 4.0)


def test_mdoc_frame_set_sections_are_ignored(tmp_path):
    frame_set = "[FrameSet = 0]\nTiltAngle = 99\nDateTime = garbage\n\n"
    text = HEADER + _section(0, -3.0) + frame_set + _section(1, 3.0)
    mdoc = read_mdoc(_write(tmp_path / "a.mdoc", text))
    np.testing.assert_allclose(mdoc.angles_deg, [-3.0, 3.0])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("PixelSpacing = 2\n[FrameSet = 0]\nTiltAngle = 1\n", "FrameSet"),
        ("PixelSpacing = 2\n", "ZValue"),
        ("[ZValue = 0]\nTiltAngle = 1\n[ZValue = 0]\nTiltAngle = 2\n", "0..1"),
        ("[ZValue = 0]\nTiltAngle = 1\n[ZValue = 2]\nTiltAngle = 2\n", "0..1"),
        ("[ZValue = 0]\nTiltAngle = 1\n[ZValue = 1]\nExposureDose = 2\n", "ZValue = 1"),
        ("[ZValue = 0]\nTiltAngle = one\n", "line 2"),
        ("[ZValue = 0]\nTiltAngle = 1\nDateTime = 2022/06/09\n", "line 3"),
        (
            "[ZValue = 0]\nTiltAngle = 1\nDateTime = 09-Jun-22  14:03:12\n"
            "[ZValue = 1]\nTiltAngle = 2\n",
            "no DateTime",
        ),
    ],
)
def test_mdoc_errors_are_one_line(tmp_path, text, needle):
    path = _write(tmp_path / "bad.mdoc", text, crlf=True)
    with pytest.raises(InputError) as err:
        read_mdoc(path)
    assert needle in assert_one_line(err, path)


def test_mdoc_missing_file(tmp_path):
    path = tmp_path / "none.mdoc"
    with pytest.raises(InputError) as err:
        read_mdoc(path)
    assert "no such file" in assert_one_line(err, path)


# --------------------------------------------------------------------------- defocus


def test_ctfplotter_version2_with_ranges_covering_several_views(tmp_path):
    text = "1 3 -60.00 -54.00 4000 2\n4 4 -51.00 -51.00 4100\n5 7 -48.00 -42.00 4200.5\n"
    defocus = read_defocus(_write(tmp_path / "a.defocus", text), n_tilts=7)
    np.testing.assert_allclose(defocus, [4.0, 4.0, 4.0, 4.1, 4.2005, 4.2005, 4.2005])
    assert len(read_defocus(tmp_path / "a.defocus")) == 7


def test_ctfplotter_version3_astigmatic(tmp_path):
    text = "1  0 0. 0. 0 3\n1 1 -3.00 -3.00 3000 3400 45.0\n2 2 0.00 0.00 3100 3300 -12.5\n"
    defocus = read_defocus(_write(tmp_path / "a.defocus", text, crlf=True))
    np.testing.assert_allclose(defocus, [3.2, 3.2])


def test_ctfplotter_fills_unestimated_views_from_the_nearest(tmp_path, caplog):
    text = "2 2 -3 -3 3000\n5 5 6 6 5000\n"
    defocus = read_defocus(_write(tmp_path / "a.defocus", text), n_tilts=7)
    np.testing.assert_allclose(defocus, [3.0, 3.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    assert "no defocus for views 1, 3, 4, 6, 7" in caplog.text


def test_ctfplotter_overlapping_ranges_take_the_nearest_centre(tmp_path):
    text = "1 5 0 0 3000\n4 8 0 0 4000\n"
    defocus = read_defocus(_write(tmp_path / "a.defocus", text))
    np.testing.assert_allclose(defocus, [3, 3, 3, 3, 4, 4, 4, 4])


CTFFIND = """# Output from CTFFind version 4.1.14, run on 2022-06-09 14:03:12
# Input file: /data/TS_01.mrc ; Number of micrographs: 3
# Pixel size: 2.125 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of\
 astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in\
 Angstroms) up to which CTF rings were fit successfully
1.000000 30000.0 32000.0 -63.4 0.000000 0.078 6.84
3.000000 35000.0 35000.0 12.0 0.000000 0.071 7.10
2.000000 40000.0 42000.0 80.1 0.000000 0.066 8.02
"""


def test_ctffind4_averages_astigmatism_and_orders_by_micrograph(tmp_path):
    defocus = read_defocus(_write(tmp_path / "diag.txt", CTFFIND, crlf=True), n_tilts=3)
    np.testing.assert_allclose(defocus, [3.1, 4.1, 3.5])


def test_plain_list_in_micrometres(tmp_path):
    defocus = read_defocus(_write(tmp_path / "d.txt", "3.5\n\n 4.25 \n5\n"), n_tilts=3)
    np.testing.assert_allclose(defocus, [3.5, 4.25, 5.0])


@pytest.mark.parametrize(
    ("text", "n_tilts", "needle"),
    [
        ("3500\n3600\n", None, "µm"),  # nm, not guessed
        ("0.00035\n", None, "µm"),  # m, not guessed
        ("3.5\n3.6\n", 3, "2 values for a stack of 3"),
        ("3.5\nabc\n", None, "line 2"),
        ("", None, "no defocus values"),
        ("# only comments\n", None, "no defocus values"),
        ("1 0 0. 0. 0 3\n", None, "no defocus rows"),
        ("1 1 0 0 3000\n9 9 0 0 3000\n", 5, "view 9"),
        ("0 0 0 0 3000\n1 1 0 0 3000\n", None, "counted from 1"),
        ("1 1 0 0\n", None, "line 1 has 4 values"),
        ("1 0 0. 0. 0 3\n1 1 0 0 3000\n", None, "astigmatism"),
        (CTFFIND, 4, "3 CTFFIND4 rows for a stack of 4"),
        (CTFFIND.replace("3.000000", "5.000000"), None, "micrograph numbers"),
        ("# CTFFind\n1 20000 20000 0 0\n", None, "at least 7"),
    ],
)
def test_defocus_errors_are_one_line(tmp_path, text, n_tilts, needle):
    path = _write(tmp_path / "bad.defocus", text)
    with pytest.raises(InputError) as err:
        read_defocus(path, n_tilts=n_tilts)
    assert needle in assert_one_line(err, path)


def test_defocus_missing_file(tmp_path):
    path = tmp_path / "none.defocus"
    with pytest.raises(InputError) as err:
        read_defocus(path)
    assert "no such file" in assert_one_line(err, path)
