"""Dataset readers: AreTomo3 folders, Warp/WarpTools projects, RELION-5 tomograms.star, pairs."""

import json
from pathlib import Path

import numpy as np
import pytest
from alignment_writers import (
    write_aretomo_aln,
    write_aretomo_tlt_txt,
    write_relion_star,
    write_warp_xml,
)
from messages import assert_one_line

from deepdewedge.io.dataset import TomogramEntry, entries_from_lists, read_dataset
from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.mrc import write_volume
from deepdewedge.io.relion import read_star
from deepdewedge.io.relion_tomograms import write_tomograms_star_copy

# An asymmetric tilt series, -50..+65 in 5° steps, plus a view at +68 that is left out.
ANGLES = np.append(np.arange(-50.0, 66.0, 5.0), 68.0)
EXCLUDED = ANGLES > 66.0


def _geometry() -> TiltSeriesGeometry:
    n = len(ANGLES)
    order = np.argsort(np.abs(ANGLES), kind="stable")
    pre = np.empty(n)
    pre[order] = 3.0 * np.arange(n)
    return TiltSeriesGeometry(
        tilt_angle_deg=ANGLES,
        tilt_axis_angle_deg=np.full(n, 85.0),
        shift_x_px=np.linspace(-3.0, 3.0, n),
        shift_y_px=np.linspace(2.0, -2.0, n),
        excluded=EXCLUDED,
        pre_exposure_e_per_a2=pre,
    )


def _volume(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_volume(path, rng.standard_normal((8, 12, 16)).astype(np.float32), voxel_size=10.0)


# --------------------------------------------------------------------------- RELION-5

TOMOGRAMS_COLUMNS = [
    "rlnTomoName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMicrographOriginalPixelSize",
    "rlnTomoHand",
    "rlnOpticsGroupName",
    "rlnTomoTiltSeriesPixelSize",
    "rlnTomoTiltSeriesStarFile",
    "rlnTomoTomogramBinning",
    "rlnTomoSizeX",
    "rlnTomoSizeY",
    "rlnTomoSizeZ",
    "rlnTomoReconstructedTomogramHalf1",
    "rlnTomoReconstructedTomogramHalf2",
]


def _tomograms_star(path: Path, rows: list[list[str]], columns=TOMOGRAMS_COLUMNS) -> Path:
    """A tomograms.star as RELION-5 writes it: version line, data_global, numbered labels."""
    lines = ["", "# version 50001", "", "data_global", "", "loop_ "]
    lines += [f"_{label} #{k} " for k, label in enumerate(columns, start=1)]
    lines += [" ".join(row) + " " for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n")
    return path


def _relion_row(name: str, *, job: str = "Tomograms/job008") -> list[str]:
    return [
        name,
        "300.000000",
        "2.700000",
        "0.100000",
        "1.350000",
        "-1.00000",
        "opticsGroup1",
        "1.350000",
        f"AlignTiltSeries/job005/tilt_series/{name}.star",
        "7.407407",
        "4000",
        "4000",
        "1500",
        f"{job}/tomograms/rec_{name}_half1.mrc",
        f"{job}/tomograms/rec_{name}_half2.mrc",
    ]


@pytest.fixture
def relion_project(tmp_path: Path) -> Path:
    """A RELION-5 project: two aligned tilt series, TS_02 without its second half."""
    project = tmp_path / "relion"
    for name in ("TS_01", "TS_02"):
        series = project / "AlignTiltSeries/job005/tilt_series" / f"{name}.star"
        series.parent.mkdir(parents=True, exist_ok=True)
        write_relion_star(series, _geometry(), 1.35, name=name)
    folder = project / "Tomograms/job008/tomograms"
    _volume(folder / "rec_TS_01_half1.mrc", 1)
    _volume(folder / "rec_TS_01_half2.mrc", 2)
    _volume(folder / "rec_TS_02_half1.mrc", 3)
    star = project / "Tomograms/job008/tomograms.star"
    return _tomograms_star(star, [_relion_row("TS_01"), _relion_row("TS_02")])


def test_relion_tomograms_star(relion_project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project folder: paths resolve above the STAR file
    project = relion_project.parents[2]
    first, second = read_dataset(relion_project)
    folder = project / "Tomograms/job008/tomograms"
    assert first == TomogramEntry(
        "TS_01",
        folder / "rec_TS_01_half1.mrc",
        folder / "rec_TS_01_half2.mrc",
        tilt_range_deg=(-50.0, 65.0),  # rlnTomoYTilt of the views RELION kept
    )
    assert second.name == "TS_02" and second.tomo1 is None
    assert "rec_TS_02_half2.mrc" in second.error and str(relion_project) in second.error
    assert "\n" not in second.error


def test_relion_paths_relative_to_the_current_folder(relion_project, monkeypatch):
    project = relion_project.parents[2]
    monkeypatch.chdir(project)
    entries = read_dataset(Path("Tomograms/job008/tomograms.star"))
    assert entries[0].tomo0 == project / "Tomograms/job008/tomograms/rec_TS_01_half1.mrc"
    assert entries[0].tilt_range_deg == (-50.0, 65.0)


def test_relion_star_without_half_columns(tmp_path):
    star = _tomograms_star(
        tmp_path / "tomograms.star", [_relion_row("TS_01")[:-1]], TOMOGRAMS_COLUMNS[:-1]
    )
    with pytest.raises(InputError) as err:
        read_dataset(star)
    assert "_rlnTomoReconstructedTomogramHalf2" in assert_one_line(err, star)
    tilt_series = write_relion_star(tmp_path / "TS_01.star", _geometry(), 1.35)
    with pytest.raises(InputError) as err:
        read_dataset(tilt_series)
    assert "data_global" in assert_one_line(err, tilt_series)


def test_relion_unreadable_tilt_series_is_an_entry_error(relion_project):
    series = relion_project.parents[2] / "AlignTiltSeries/job005/tilt_series/TS_01.star"
    series.write_text("data_TS_01\nloop_\n_rlnTomoYTilt #1\nabc\n")
    entry = read_dataset(relion_project)[0]
    assert entry.tilt_range_deg is None and str(series) in entry.error and ";" in entry.error


def _unchanged(source: list, copy: list, column: str, *, added: bool) -> None:
    assert [b.name for b in copy] == [b.name for b in source]
    for old, new in zip(source, copy, strict=True):
        assert new.values == old.values
        if old.name != "global":
            assert new.columns == old.columns
            assert [r for _, r in new.rows] == [r for _, r in old.rows]
            continue
        assert new.columns == old.columns + [column] if added else new.columns == old.columns
        k = new.columns.index(column)
        for (_, before), (_, after) in zip(old.rows, new.rows, strict=True):
            assert after[:k] + after[k + 1 :] == [v for i, v in enumerate(before) if i != k]


def test_tomograms_star_copy_adds_the_refined_column(relion_project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = relion_project.parents[2]
    refined = _volume(project / "DeepDeWedge/job010/refined/TS_01_refined.mrc")
    copy = project / "DeepDeWedge/job010/tomograms.star"
    assert write_tomograms_star_copy(relion_project, copy, {"TS_01": refined}) == copy
    source, back = read_star(relion_project), read_star(copy)
    _unchanged(source, back, "rlnTomoReconstructedTomogram", added=True)
    table = back[0]
    k = table.columns.index("rlnTomoReconstructedTomogram")
    assert [r[k] for _, r in table.rows] == ["DeepDeWedge/job010/refined/TS_01_refined.mrc", ""]
    assert "_rlnTomoReconstructedTomogram #16 " in copy.read_text()
    entries = read_dataset(copy)  # the copy is a dataset too, the refined volume its full one
    assert entries[0].full == refined and entries[0].tomo0 == read_dataset(relion_project)[0].tomo0


def test_tomograms_star_copy_replaces_only_refined_rows(tmp_path, relion_project):
    columns = TOMOGRAMS_COLUMNS + ["rlnTomoReconstructedTomogram"]
    rows = [r + [f"Tomograms/job007/tomograms/rec_{r[0]}.mrc"] for r in map(_relion_row, "AB")]
    source = _tomograms_star(relion_project.with_name("both.star"), rows, columns)
    text = source.read_text() + "\n# version 50001\n\ndata_extra\n\n_rlnSomething  'a b'\n"
    source.write_text(text)
    refined = tmp_path / "elsewhere" / "A_refined.mrc"  # outside the project: absolute
    copy = write_tomograms_star_copy(source, tmp_path / "copy.star", {"A": refined})
    _unchanged(read_star(source), read_star(copy), "rlnTomoReconstructedTomogram", added=False)
    rows = read_star(copy)[0].rows
    assert rows[0][1][-1] == refined.as_posix()
    assert rows[1][1][-1] == "Tomograms/job007/tomograms/rec_B.mrc"
    changed = [
        (a, b)
        for a, b in zip(text.splitlines(), copy.read_text().splitlines(), strict=True)
        if a != b
    ]
    assert len(changed) == 1 and changed[0][1].endswith(f"{refined.as_posix()} ")
    with pytest.raises(ValueError, match="C"):
        write_tomograms_star_copy(source, tmp_path / "copy.star", {"C": refined})


# --------------------------------------------------------------------------- AreTomo3


@pytest.fixture
def aretomo3_folder(tmp_path: Path) -> Path:
    """AreTomo3's -OutDir: TS_1 complete, TS_2 without .aln, TS_3 without its odd half."""
    out = tmp_path / "aretomo3"
    out.mkdir()
    geometry = _geometry()
    for name in ("TS_1", "TS_2", "TS_3"):
        _volume(out / f"{name}_EVN_Vol.mrc", 1)
        write_aretomo_tlt_txt(out / f"{name}_TLT.txt", geometry)
    for name in ("TS_1", "TS_2"):
        _volume(out / f"{name}_ODD_Vol.mrc", 2)
        _volume(out / f"{name}_Vol.mrc", 3)
    write_aretomo_aln(out / "TS_1.aln", geometry)  # +68 is a dark frame, not a row
    (out / "TS_1_Imod").mkdir()
    (out / "TiltSeries_Metrics.csv").write_text(
        "Tilt_Series,Thickness(Pix),Tilt_Axis,Global_Shift(Pix),Bad_Patch_Low,Bad_Patch_All,"
        "Defocus(A),ExtPhase(Deg),CTF_Res(A),CTF_Score,DF_Hand,Pix_Size(A),Cs(nm),Kv,Alpha0,"
        "Beta0\nTS_1.mrc,    412,  85.00,    12.30,  0.00, 0.00,  35210.1,   0.0,  8.12,  0.0421,"
        " 1,  1.35, 2.7, 300, 0.0, 0.0\n"
    )
    return out


def test_aretomo3_folder(aretomo3_folder):
    out = aretomo3_folder
    one, two, three = read_dataset(out)
    assert one == TomogramEntry(
        "TS_1",
        out / "TS_1_EVN_Vol.mrc",
        out / "TS_1_ODD_Vol.mrc",
        full=out / "TS_1_Vol.mrc",
        tilt_range_deg=(-50.0, 65.0),  # the .aln's kept rows: the dark +68 view is not one
    )
    assert two.tilt_range_deg == (-50.0, 68.0) and two.error is None  # _TLT.txt: every view
    assert three.tomo1 is None and three.full is None
    assert str(out / "TS_3_ODD_Vol.mrc") in three.error and "-SplitSum 1" in three.error


def test_aretomo3_unreadable_aln_is_an_entry_error(aretomo3_folder):
    aln = aretomo3_folder / "TS_1.aln"
    aln.write_text(aln.read_text().replace("-50.00", "-5O.00"))
    entry = read_dataset(aretomo3_folder)[0]
    assert entry.tilt_range_deg is None and str(aln) in entry.error and "\n" not in entry.error


def test_aretomo3_volumes_saved_xzy(aretomo3_folder):
    volume = np.zeros((16, 8, 12), dtype=np.float32)  # (y, z, x): AreTomo3's -FlipVol 0
    write_volume(aretomo3_folder / "TS_2_EVN_Vol.mrc", volume)
    entry = read_dataset(aretomo3_folder)[1]
    assert str(aretomo3_folder / "TS_2_EVN_Vol.mrc") in entry.error
    assert "-FlipVol 1" in entry.error


def test_aretomo3_folder_without_volumes(tmp_path):
    out = tmp_path / "aligned_only"  # -VolZ 0: tilt series and alignments, no volumes
    out.mkdir()
    for name in ("TS_1", "TS_1_EVN", "TS_1_ODD"):
        _volume(out / f"{name}.mrc")
    write_aretomo_aln(out / "TS_1.aln", _geometry())
    write_aretomo_tlt_txt(out / "TS_1_TLT.txt", _geometry())
    with pytest.raises(InputError) as err:
        read_dataset(out)
    assert "-VolZ" in assert_one_line(err, out)


# --------------------------------------------------------------------------- Warp


@pytest.fixture
def warp_folder(tmp_path: Path) -> Path:
    """WarpTools' processing folder after ts_reconstruct --halfmap_frames at 10 Å/px."""
    processing = tmp_path / "warp_tiltseries"
    reconstruction = processing / "reconstruction"
    processing.mkdir()
    xml = write_warp_xml(processing / "TS_1.xml", _geometry(), 1.35)
    xml.write_bytes(xml.read_bytes().replace(b'LevelAngleY="0"', b'LevelAngleY="1.5"'))
    _volume(reconstruction / "TS_1_10.00Apx.mrc", 1)
    _volume(reconstruction / "even" / "TS_1_10.00Apx.mrc", 2)
    _volume(reconstruction / "odd" / "TS_1_10.00Apx.mrc", 3)
    _volume(reconstruction / "even" / "TS_2_10.00Apx.mrc", 4)
    _volume(reconstruction / "deconv" / "TS_1_10.00Apx.mrc", 5)
    return processing


@pytest.mark.parametrize("subfolder", ["", "reconstruction"])
def test_warp_folder(warp_folder, subfolder):
    reconstruction = warp_folder / "reconstruction"
    one, two = read_dataset(warp_folder / subfolder)
    assert one == TomogramEntry(
        "TS_1_10.00Apx",
        reconstruction / "even" / "TS_1_10.00Apx.mrc",
        reconstruction / "odd" / "TS_1_10.00Apx.mrc",
        full=reconstruction / "TS_1_10.00Apx.mrc",
        # Warp's tilts t = Angle + LevelAngleY of the views in use, -48.5..66.5, in a frame
        # whose z is this package's reversed: the planes of -t were measured.
        tilt_range_deg=(-66.5, 48.5),
    )
    assert two.tomo1 is None and two.tilt_range_deg is None
    assert str(reconstruction / "odd" / "TS_2_10.00Apx.mrc") in two.error


# --------------------------------------------------------------------------- paired files


@pytest.fixture
def pairs_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pairs"
    for name in ("a_tomo0", "a_tomo1", "a_full", "b_half1", "b_half2", "b", "c_even", "c_odd"):
        _volume(folder / f"{name}.mrc")
    for name in ("d_EVN", "d_ODD", "e_tomo0", "notes"):
        _volume(folder / f"{name}.mrc")
    (folder / "a_reconstruct.json").write_text(
        json.dumps({"n_tilts_used": 23, "tilt_range_deg": [-50.0, 65.0]})
    )
    return folder


def test_paired_files(pairs_folder):
    f = pairs_folder
    a, b, c, d, e = read_dataset(f)
    assert a == TomogramEntry(
        "a", f / "a_tomo0.mrc", f / "a_tomo1.mrc", f / "a_full.mrc", (-50.0, 65.0)
    )
    assert b == TomogramEntry("b", f / "b_half1.mrc", f / "b_half2.mrc", f / "b.mrc")
    assert c == TomogramEntry("c", f / "c_even.mrc", f / "c_odd.mrc")
    assert d == TomogramEntry("d", f / "d_EVN.mrc", f / "d_ODD.mrc")
    assert e.name == "e" and e.tomo1 is None and str(f / "e_tomo1.mrc") in e.error


def test_glob_pattern_and_single_file(pairs_folder):
    entries = read_dataset(pairs_folder / "*_tomo0.mrc")  # partners found beside them
    assert [(x.name, x.tomo1 is not None) for x in entries] == [("a", True), ("e", False)]
    (entry,) = read_dataset(pairs_folder / "c_odd.mrc")
    assert entry.tomo0 == pairs_folder / "c_even.mrc"
    with pytest.raises(InputError) as err:
        read_dataset(pairs_folder / "*_half9.mrc")
    assert "matches no files" in assert_one_line(err, pairs_folder / "*_half9.mrc")


def test_bad_record_is_an_entry_error(pairs_folder):
    record = pairs_folder / "a_reconstruct.json"
    record.write_text('{"tilt_range_deg": [-50.0]}')
    assert str(record) in read_dataset(pairs_folder)[0].error
    record.write_text("{not json")
    assert str(record) in read_dataset(pairs_folder)[0].error


def test_duplicate_names_and_empty_folders(pairs_folder, tmp_path):
    _volume(pairs_folder / "c_tomo0.mrc")
    _volume(pairs_folder / "c_tomo1.mrc")
    with pytest.raises(InputError) as err:
        read_dataset(pairs_folder)
    assert "'c'" in assert_one_line(err, pairs_folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    _volume(empty / "TS_01_Vol.mrc")  # a volume without a half token is no pair
    with pytest.raises(InputError) as err:
        read_dataset(empty)
    assert "no tomograms found in" in assert_one_line(err, empty)
    with pytest.raises(InputError) as err:
        read_dataset(tmp_path / "missing")
    assert_one_line(err, tmp_path / "missing")


def test_entries_from_lists(pairs_folder, tmp_path):
    f = pairs_folder
    entries = entries_from_lists(
        [f / "a_tomo0.mrc", str(f / "c_even.mrc"), f / "a_tomo0.mrc"],
        [f / "a_tomo1.mrc", f / "c_odd.mrc", tmp_path / "gone.mrc"],
    )
    assert [e.name for e in entries] == ["a", "c", "a_2"]
    assert entries[0].tilt_range_deg == (-50.0, 65.0) and entries[0].error is None
    assert entries[1] == TomogramEntry("c", f / "c_even.mrc", f / "c_odd.mrc")
    assert str(tmp_path / "gone.mrc") in entries[2].error and "tomo1_files" in entries[2].error
    (entry,) = entries_from_lists([f / "b_half1.mrc"], [f / "b_half2.mrc"], [f / "b.mrc"])
    assert entry == TomogramEntry("b", f / "b_half1.mrc", f / "b_half2.mrc", f / "b.mrc")
    with pytest.raises(InputError, match="tomo1_files: 1 files for 2 tomo0_files"):
        entries_from_lists([f / "a_tomo0.mrc", f / "c_even.mrc"], [f / "a_tomo1.mrc"])


def test_a_folder_of_tilt_series_finds_each_stack_with_what_lies_beside_it(tmp_path):
    from deepdewedge.io.tilt_series_folder import read_tilt_series_folder

    for name in ("a.mrc", "a.xf", "a.tlt", "a.xtilt", "a.defocus", "b.st", "b.aln"):
        (tmp_path / name).write_text("x")
    for name in ("c.mrc", "c.mrc.mdoc", "volume.mrc", "d_rec.mrc", "notes.txt"):
        (tmp_path / name).write_text("x")
    found = {s.name: s for s in read_tilt_series_folder(tmp_path)}
    assert sorted(found) == ["a", "b", "c"]
    assert found["a"].reconstruct_options() == {
        "tilt_series": tmp_path / "a.mrc",
        "alignment": tmp_path / "a.xf",
        "tilt_angles": tmp_path / "a.tlt",
        "x_tilt_file": tmp_path / "a.xtilt",
        "defocus_file": tmp_path / "a.defocus",
    }
    assert found["b"].alignment == tmp_path / "b.aln" and found["b"].tilt_angles is None
    assert found["c"].mdoc == tmp_path / "c.mrc.mdoc" and found["c"].alignment is None
