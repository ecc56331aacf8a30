"""Derive the EMPIAR-10499 fixture from the warpylib 1.1.2 source archive.

    pip download --no-deps --no-binary :all: warpylib==1.1.2
    tar xzf warpylib-1.1.2.tar.gz
    python tests/data/empiar10499/make_fixture.py warpylib-1.1.2/testdata

Writes, next to this script: the raw stack Fourier-binned by 2 and cropped about its centre to
161 x 160 pixels (float16, 20 Å pixels), the IMOD .xf with its shifts halved, the .tlt, and
Warp's .xml made from the .xf (its offsets are in Å, so they hold at any binning).
"""

import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import torch

from deepdewedge.reconstruct.binning import bin_images

BIN = 2
# Odd height keeps the crop's centre on the binned image's centre (row 157 of 315).
CROP_YX = (161, 160)


def main(testdata: Path) -> None:
    here = Path(__file__).parent
    with mrcfile.open(testdata / "00254.stack.mrc", permissive=True) as mrc:
        stack = torch.from_numpy(np.array(mrc.data, dtype=np.float32))
        pixel = float(mrc.voxel_size.x)
    binned = bin_images(stack, BIN).numpy()
    _, h, w = binned.shape
    y0 = (h - 1) // 2 - (CROP_YX[0] - 1) // 2
    x0 = int(round((w - 1) / 2 - (CROP_YX[1] - 1) / 2))
    crop = binned[:, y0 : y0 + CROP_YX[0], x0 : x0 + CROP_YX[1]]
    assert (y0 + (CROP_YX[0] - 1) / 2, x0 + (CROP_YX[1] - 1) / 2) == ((h - 1) / 2, (w - 1) / 2)
    with mrcfile.new(here / "00254_bin2.mrc", overwrite=True) as mrc:
        mrc.set_data(crop.astype(np.float16))
        mrc.voxel_size = pixel * BIN
    rows = np.loadtxt(testdata / "xf_import" / "00254.xf")
    rows[:, 4:] /= BIN
    np.savetxt(here / "00254_bin2.xf", rows, fmt="%12.7f")
    shutil.copy(testdata / "xf_import" / "00254.tlt", here / "00254.tlt")
    shutil.copy(testdata / "xf_import" / "00254.xml", here / "00254.xml")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
