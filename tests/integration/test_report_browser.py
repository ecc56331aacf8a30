"""The dataset report as a browser shows it: headless Chromium renders the page offline."""

import io
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from deepdewedge.evaluate.figures import loss_curve_figure
from deepdewedge.pipeline.report import write_report
from deepdewedge.pipeline.report_images import tomogram_images
from deepdewedge.simulate.phantom import simulate_tomogram

WINDOW = (1200, 2000)


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium not installed: apt-get install chromium")
    return path


def _run(chromium, tmp_path, page, *args):
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _report(tmp_path):
    rows = []
    for seed, name in enumerate(("TS_01", "TS_02", "TS_03")):
        generator = torch.Generator().manual_seed(seed)
        tomo = simulate_tomogram((24, 96, 96), tilt_step_deg=4.0, generator=generator)
        row = {
            "name": name,
            "status": "refined",
            "tilt_range_deg": [-60.0, 60.0],
            "seconds": {"reconstruct": 14.2, "refine": 95.0 + seed},
            "outputs": {
                "refined": tmp_path / "refined" / f"{name}_refined.mrc",
                "half-difference": tmp_path / "refined" / f"{name}_half_difference.mrc",
            },
            "images": tomogram_images(
                tomo["tomo_full"].numpy(),
                tomo["ground_truth"].numpy(),
                (tomo["tomo0"] - tomo["tomo1"]).numpy(),
            ),
        }
        rows.append(row)
    rows[1] = {
        "name": "TS_02",
        "status": "failed",
        "tilt_range_deg": [-48.0, 62.0],
        "seconds": {"reconstruct": 13.0},
        "error": "TS_02.mrc: 41 tilt images but TS_02.tlt lists 40 angles",
    }
    figure = loss_curve_figure(np.arange(1, 21), 1.0 / np.arange(1, 21), 1.2 / np.arange(1, 21))
    loss = io.BytesIO()
    figure.savefig(loss, format="png", dpi=80)
    return write_report(
        tmp_path / "project" / "report.html",
        title="DeepDeWedge: simulated dataset",
        rows=rows,
        loss_curve_png=loss.getvalue(),
        summary={"model checkpoint": "logs/checkpoints/epoch=19.ckpt", "epochs": 20},
    )


def test_report_renders_in_chromium(chromium, tmp_path):
    page = _report(tmp_path)
    shot = tmp_path / "shot.png"
    result = _run(chromium, tmp_path, page, f"--screenshot={shot}")
    assert shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot)
    assert image.format == "PNG" and image.size == WINDOW
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    # The failed tomogram's red shows in the first screen (table row, alert box).
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 200
    # Grey noise of the slices: many neutral pixels of many different levels.
    neutral = (np.ptp(pixels.astype(int), axis=2) == 0) & (pixels[..., 0] % 255 != 0)
    assert len(np.unique(pixels[neutral][:, 0])) >= 12

    result = _run(chromium, tmp_path, page, "--dump-dom", "--virtual-time-budget=5000")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert dom.count('<tr class="refined">') == 2 and dom.count('<tr class="failed">') == 1
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 1 + 2 * 2
    assert "41 tilt images but TS_02.tlt lists 40 angles" in dom
