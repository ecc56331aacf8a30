import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import deepdewedge.pipeline.report as report
import deepdewedge.pipeline.report_images as report_images
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.pipeline.report import summary_counts, write_report
from deepdewedge.pipeline.report_images import mean_xz_power_spectrum, tomogram_images


def _png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def _volume(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def images():
    volume = _volume((24, 32, 32))
    return tomogram_images(volume, volume * 0.5, _volume((24, 32, 32), seed=1))


@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 32, 32), (12, 32, 24)])
def test_images_of_small_volumes_are_small_pngs(shape):
    volume = _volume(shape)
    images = tomogram_images(volume, volume, volume)
    assert set(images) == {"orthoslices", "power_spectrum"}
    slices, spectrum = _png(images["orthoslices"]), _png(images["power_spectrum"])
    # Three columns of 168-px panels with labels; z drawn to the same scale as x and y.
    assert 500 <= slices.width <= 560
    d, h, w = shape
    panels = 168 * (h + 2 * d) / max(h, w)
    assert panels < slices.height < panels + 40
    assert 330 <= spectrum.width <= 380 and 200 <= spectrum.height <= 230
    assert len(images["orthoslices"]) < 150_000
    # The slices use the whole grey range, not one flat grey.
    pixels = np.asarray(slices.convert("L"))
    assert pixels.min() == 0 and pixels.max() == 255 and np.unique(pixels).size > 8


def test_two_columns_without_a_half_difference():
    volume = _volume((8, 32, 32))
    with_difference = _png(tomogram_images(volume, volume, volume)["orthoslices"])
    without = _png(tomogram_images(volume, volume)["orthoslices"])
    assert without.height == with_difference.height
    assert with_difference.width - without.width == 168 + 4


def test_a_large_memory_map_is_binned_once_and_stays_small(tmp_path, monkeypatch):
    shape = (12, 40, 1100)  # wider than 512 voxels: binned by 3
    path = tmp_path / "tomo.raw"
    np.memmap(path, np.float32, "w+", shape=shape)[:] = _volume(shape)
    volume = np.memmap(path, np.float32, "r", shape=shape)
    binned = []
    original = report_images.binned_preview

    def spy(volume, **kwargs):
        binned.append(original(volume, **kwargs))
        return binned[-1]

    monkeypatch.setattr(report_images, "binned_preview", spy)
    images = tomogram_images(volume, volume, volume)
    assert [b.shape for b in binned] == [(4, 14, 367)] * 3
    slices = _png(images["orthoslices"])
    assert slices.width < 560 and slices.height < 100  # flat: 40 x 1100 shown 6 x 168 px
    assert len(images["orthoslices"]) + len(images["power_spectrum"]) < 60_000


def test_typical_tomogram_row_fits_the_page_budget():
    # A thin slab, 4 times wider than thick, as most tomograms are: the noisiest case.
    volume = _volume((48, 192, 192))
    images = tomogram_images(volume, volume, volume)
    assert len(images["orthoslices"]) < 70_000
    assert len(images["power_spectrum"]) < 20_000


def test_spectrum_shows_the_missing_wedge_around_kz():
    noise = torch.from_numpy(_volume((32, 32, 32)))
    mask = missing_wedge_mask((32, 32, 32), mw_angle_deg=60.0)
    wedged = torch.fft.irfftn(torch.fft.rfftn(noise) * mask, s=noise.shape).numpy()
    spectrum = mean_xz_power_spectrum(wedged)
    assert spectrum.shape == (32, 32)
    kz, kx = np.meshgrid(np.arange(32) - 16, np.arange(32) - 16, indexing="ij")
    radius = np.hypot(kz, kx)
    ring = (radius > 5) & (radius < 14)
    # Measured data lies within 30° of kx (tilts up to ±60°); the wedge lies around kz.
    angle = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    inside, outside = ring & (angle > 70), ring & (angle < 20)
    assert np.median(spectrum[outside]) - np.median(spectrum[inside]) > np.log(20)
    full = mean_xz_power_spectrum(noise.numpy())
    assert abs(np.median(full[outside]) - np.median(full[inside])) < np.log(2)


def test_images_reject_bad_volumes():
    with pytest.raises(ValueError, match="refined volume must have shape"):
        tomogram_images(_volume((8, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="panel_px"):
        tomogram_images(_volume((8, 8, 8)), _volume((8, 8, 8)), panel_px=4)


def test_summary_counts():
    rows = [{"status": s} for s in ("refined", "refined", "failed", "pending", "running")]
    assert summary_counts(rows) == {
        "refined": 2,
        "running": 1,
        "pending": 1,
        "failed": 1,
        "total": 5,
    }
    assert summary_counts([]) == {"refined": 0, "running": 0, "pending": 0, "failed": 0, "total": 0}
    with pytest.raises(ValueError, match="row 0 .*'done'"):
        summary_counts([{"name": "a", "status": "done"}])


@pytest.fixture()
def rows(images, tmp_path):
    shot = tmp_path / "given.png"
    shot.write_bytes(images["power_spectrum"])
    return [
        {
            "name": "TS_01",
            "status": "refined",
            "tilt_range_deg": [-54.0, 60.0],
            "seconds": {"prepare": 3.5, "fit": 125.0, "refine": 4000.0},
            "outputs": {"refined": tmp_path / "refined" / "TS 01 refined.mrc"},
            "images": images,
        },
        {
            "name": "<script>alert(1)</script>",
            "status": "failed",
            "error": "TS_02.mrc: header says 512 x 512 x 60 but the file holds 40 sections\n",
        },
        {"name": "TS_03", "status": "pending", "images": {"power_spectrum": shot}},
        {"name": "TS_04", "status": "running"},
    ]


def test_report_is_self_contained_and_escaped(rows, images, tmp_path):
    out = tmp_path / "project"
    path = write_report(
        out / "report.html",
        title="Dataset <A & B>",
        rows=rows,
        loss_curve_png=images["power_spectrum"],
        summary={"model checkpoint": "logs/best.ckpt", "epochs": 80, "note": "a < b"},
    )
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Dataset &lt;A &amp; B&gt;" in page and "a &lt; b" in page
    for name in ("TS_01", "TS_03", "TS_04", "logs/best.ckpt"):
        assert name in page
    assert not re.search(r"https?:", page)
    # The loss curve, two images of TS_01 and the spectrum file given for TS_03, all inline.
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == page.count("<img ") == 4
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "1 refined" in re.sub(r"<[^>]+>", "", page)
    assert "1 failed" in re.sub(r"<[^>]+>", "", page)
    # Links are relative to the page's folder, URL-quoted.
    assert 'href="../refined/TS%2001%20refined.mrc"' in page
    assert "1 h 06 min" in page and "2 min 05 s" in page and "3.5 s" in page
    assert "−54° to +60°" in page


def test_failed_rows_carry_their_error(rows, tmp_path):
    page = write_report(tmp_path / "report.html", title="t", rows=rows).read_text()
    error = "TS_02.mrc: header says 512 x 512 x 60 but the file holds 40 sections"
    assert page.count(error) == 2  # in the table and in the tomogram's section
    assert '<tr class="failed">' in page and 'class="tomo failed"' in page
    assert 'class="alert"' in page  # listed at the top of the page


def test_a_report_without_failures_has_no_alert(tmp_path):
    page = write_report(
        tmp_path / "report.html", title="t", rows=[{"name": "a", "status": "pending"}]
    ).read_text()
    assert 'class="alert"' not in page and "not refined yet" in page


def test_write_is_atomic_and_replaces_the_page(rows, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.html").write_text("old")
    path = write_report(folder, title="t", rows=rows)  # a folder gets report.html inside
    assert path == folder / "report.html"
    assert [p.name for p in folder.iterdir()] == ["report.html"]
    assert path.read_text().startswith("<!DOCTYPE html>")


def test_a_failed_write_keeps_the_old_page(rows, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.html").write_text("old")
    monkeypatch.setattr(report, "_section", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_report(folder / "report.html", title="t", rows=rows)
    assert [p.name for p in folder.iterdir()] == ["report.html"]
    assert (folder / "report.html").read_text() == "old"


def test_missing_image_files_are_noted_not_fatal(tmp_path, caplog):
    rows = [{"name": "a", "status": "refined", "images": {"orthoslices": tmp_path / "gone.png"}}]
    page = write_report(tmp_path / "report.html", title="t", rows=rows).read_text()
    assert "central slices: image missing" in page and "<img " not in page
    assert "gone.png" in caplog.text


def test_bad_rows_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="status must be one of"):
        write_report(tmp_path / "r.html", title="t", rows=[{"name": "a", "status": "ok"}])
    with pytest.raises(ValueError, match="row 0 has no name"):
        write_report(tmp_path / "r.html", title="t", rows=[{"status": "failed"}])
    with pytest.raises(ValueError, match="tilt_range_deg"):
        write_report(
            tmp_path / "r.html",
            title="t",
            rows=[{"name": "a", "status": "refined", "tilt_range_deg": [-60]}],
        )
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(
            tmp_path / "r.html",
            title="t",
            rows=[{"name": "a", "status": "refined", "images": {"x": b"GIF89a"}}],
        )
    assert not list(tmp_path.iterdir())
