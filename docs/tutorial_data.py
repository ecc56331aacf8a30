"""Make the data of docs/tutorial.md: a simulated tilt series that stands in for yours.

Run from the repository root (a few seconds on a laptop CPU):

    python docs/tutorial_data.py            # writes into ./tutorial
    python docs/tutorial_data.py other_dir  # or into another folder

It writes what a microscope session plus alignment would give you, and the ground truth
that real data never has:

    tutorial/ts.mrc           aligned tilt series, 41 images of 160 x 160 px, 10 Å/px
    tutorial/ts.tlt           its tilt angles, one per line (IMOD .tlt)
    tutorial/ts.mrc.mdoc      SerialEM-style record: angle, dose and time of each image
    tutorial/ground_truth.mrc the simulated specimen, 64 x 160 x 160 voxels (z, y, x)
"""

import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch

from deepdewedge.io.mrc import write_volume
from deepdewedge.simulate import add_noise, project, simulate_phantom

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial")
SHAPE = (64, 160, 160)  # (z, y, x) of the tomogram we will reconstruct; z is the thickness
PIXEL_SIZE = 10.0  # Å per pixel, stored in the MRC header
ANGLES = np.arange(-60.0, 60.0 + 1e-6, 3.0)  # 41 tilts, -60..60° in 3° steps
SNR = 0.25  # variance of the signal / variance of the noise in each image
DOSE = 3.0  # e/Å² per image (only recorded in the .mdoc)

generator = torch.Generator().manual_seed(2024)

# 1. The specimen: a slab of ice with macromolecule-like blobs, membranes and gold beads.
#    A real sample extends beyond the field of view, so we simulate it wider in x by the
#    distance a ray travels sideways at 60° and keep only the central 160 columns as the
#    ground truth; at high tilt the rays through the edges then cross real sample.
pad = int(np.ceil(SHAPE[0] * np.tan(np.radians(60.0)))) + 2
phantom = simulate_phantom((SHAPE[0], SHAPE[1], SHAPE[2] + 2 * pad), generator=generator)
ground_truth = phantom[..., pad : pad + SHAPE[2]]

# 2. The tilt series: parallel projections about the y axis onto a 160 px wide detector,
#    plus Gaussian noise. Dense matter comes out bright (positive); no CTF is simulated.
clean = project(phantom, torch.from_numpy(ANGLES).float(), width=SHAPE[2])
noisy = add_noise(clean, snr=SNR, generator=generator)

OUT.mkdir(parents=True, exist_ok=True)
write_volume(OUT / "ts.mrc", noisy.numpy(), voxel_size=PIXEL_SIZE)
write_volume(OUT / "ground_truth.mrc", ground_truth.numpy(), voxel_size=PIXEL_SIZE)
(OUT / "ts.tlt").write_text("".join(f"{a:.2f}\n" for a in ANGLES))

# 3. The SerialEM .mdoc. The stack is sorted by angle (ZValue 0 is -60°), but the images
#    were taken dose-symmetrically (Hagen scheme, groups of two): 0, +3, +6, -3, -6, +9,
#    +12, -9, -12, ... The DateTime of each section records that order; `ddw reconstruct`
#    reads it and splits the tilts into even and odd positions in time, not in the stack.
zero = int(np.argmin(np.abs(ANGLES)))
above = list(range(zero + 1, len(ANGLES)))  # stack indices of +3, +6, ...
below = list(range(zero - 1, -1, -1))  # stack indices of -3, -6, ...
sequence = [zero]  # stack indices in the order the images were taken
while above or below:
    for side in (above, below):
        sequence += side[:2]
        del side[:2]
start = datetime(2024, 3, 14, 10, 0, 0)
taken_at = {z: start + timedelta(seconds=45 * k) for k, z in enumerate(sequence)}

lines = [f"PixelSpacing = {PIXEL_SIZE:g}", "Voltage = 300", "ImageFile = ts.mrc", ""]
lines.append("[T = SerialEM: simulated for the DeepDeWedge tutorial]")
lines.append("")
for z, angle in enumerate(ANGLES):
    lines += [
        f"[ZValue = {z}]",
        f"TiltAngle = {angle:.2f}",
        f"ExposureDose = {DOSE:g}",
        f"PixelSpacing = {PIXEL_SIZE:g}",
        # SerialEM writes two spaces between the date and the time.
        f"DateTime = {taken_at[z]:%d-%b-%y  %H:%M:%S}",
        "",
    ]
(OUT / "ts.mrc.mdoc").write_text("\n".join(lines))

print(f"wrote {OUT}/ts.mrc {tuple(noisy.shape)}, ts.tlt, ts.mrc.mdoc, ground_truth.mrc")
print(f"acquisition order (degrees): {', '.join(f'{ANGLES[z]:g}' for z in sequence[:9])}, ...")
