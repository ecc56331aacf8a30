"""Rebuild the macromolecule templates in ``templates/`` from atomic models of the PDB.

Not imported by the package; kept so that the shipped maps can be regenerated and checked.
Usage (the source files and their checksums are listed in ``README.md``)::

    python build_templates.py SOURCE_DIR OUTPUT_DIR

Each model is turned into a density map on a 10 Å grid: every non-hydrogen atom of the first
model (waters left out, first alternate location only) is a 3D Gaussian with its number of
electrons as weight and a standard deviation of 6 Å, evaluated at the voxel centres. The
Gaussian is the low-pass filter that precedes the sampling (its transfer is 0.17 at the 10 Å
grid's Nyquist frequency). The sum, in electrons per Å³, is divided by 0.40 e/Å³ (the
electron density of a protein's non-hydrogen atoms) so that a protein's interior reads about
1, and the background is exactly zero. The map is centred on the electron-weighted centre of
mass, cropped to the smallest odd cube that holds every value above 0.001, and stored as
float16 in a compressed ``.npz``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

VOXEL_SIZE_ANGSTROM = 10.0
SIGMA_ANGSTROM = 6.0
PROTEIN_ELECTRON_DENSITY = 0.32  # e/Å³: peak of the blurred non-hydrogen density of a protein
CUTOFF = 1e-3
ELECTRONS = {
    "C": 6,
    "N": 7,
    "O": 8,
    "S": 16,
    "P": 15,
    "SE": 34,
    "ZN": 30,
    "FE": 26,
    "MG": 12,
    "CA": 20,
    "NA": 11,
    "K": 19,
    "CL": 17,
    "MN": 25,
}
# name: (source file, PDB id, description, origin of the file)
SOURCES = {
    "casx_rnp": (
        "6NY1.pdb",
        "6NY1",
        "CasX-sgRNA-DNA ribonucleoprotein (protein, RNA and 30 bp DNA)",
        "emmer 0.1.2 sdist, emmer/tests/pdb_unittest/data/6NY1.pdb",
    ),
    "cftr": (
        "6msm.pdb.bz2",
        "6MSM",
        "phosphorylated, ATP-bound human CFTR (membrane protein, detergent not modelled)",
        "mdanalysistests 2.11.0 sdist, MDAnalysisTests/data/6msm.pdb.bz2",
    ),
    "ace2_rbd": (
        "7DDO.pdb",
        "7DDO",
        "human ACE2 bound to the receptor-binding domain of a coronavirus spike",
        "biopython 1.88 sdist, Tests/PDB/7DDO.pdb",
    ),
    "tcr_pmhc": (
        "1BD2.pdb.gz",
        "1BD2",
        "T-cell receptor B7 bound to HLA-A*0201 with the Tax peptide",
        "mdanalysistests 2.11.0 sdist, MDAnalysisTests/data/mmcif/1BD2.pdb.gz",
    ),
    "cxcr4_nb": (
        "8zpm.cif",
        "8ZPM",
        "BRIL-CXCR4 fusion receptor bound to nanobody Nb6 (chemokine receptor, small)",
        "cryojax 0.6.0 sdist, tests/data/8zpm.cif",
    ),
}


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt")
    return open(path)


def _element_weight(element: str) -> float:
    element = element.strip().upper()
    if element in ("H", "D"):
        return 0.0
    if element not in ELECTRONS:
        raise ValueError(f"no electron count for element {element!r}")
    return float(ELECTRONS[element])


def read_pdb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Non-hydrogen atoms of the first model of a PDB file: `(n, 3)` xyz in Å, `(n,)` weights."""
    xyz, weight = [], []
    with _open_text(path) as handle:
        for line in handle:
            if line.startswith("ENDMDL"):
                break
            if not line.startswith(("ATOM", "HETATM")) or line[17:20].strip() == "HOH":
                continue
            if line[16] not in (" ", "A"):
                continue
            element = line[76:78].strip() or line[12:14].strip()
            w = _element_weight(element)
            if w > 0:
                xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
                weight.append(w)
    return np.asarray(xyz), np.asarray(weight)


def read_mmcif(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`read_pdb`, for the ``_atom_site`` loop of an mmCIF file."""
    with _open_text(path) as handle:
        lines = handle.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("_atom_site."))
    columns = []
    i = start
    while lines[i].startswith("_atom_site."):
        columns.append(lines[i].split(".", 1)[1].strip())
        i += 1
    col = {name: k for k, name in enumerate(columns)}
    xyz, weight = [], []
    first_model = None
    while i < len(lines) and lines[i].startswith(("ATOM", "HETATM")):
        row = lines[i].split()
        i += 1
        model = row[col["pdbx_PDB_model_num"]]
        first_model = model if first_model is None else first_model
        if model != first_model or row[col["label_comp_id"]] == "HOH":
            continue
        if row[col["label_alt_id"]] not in (".", "?", "A"):
            continue
        w = _element_weight(row[col["type_symbol"]])
        if w > 0:
            xyz.append([float(row[col[f"Cartn_{a}"]]) for a in "xyz"])
            weight.append(w)
    return np.asarray(xyz), np.asarray(weight)


def render(xyz: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Density `(n, n, n)` (z, y, x) on the 10 Å grid, centred on the centre of mass."""
    centre = (xyz * weight[:, None]).sum(0) / weight.sum()
    offsets = (xyz - centre)[:, ::-1] / VOXEL_SIZE_ANGSTROM  # zyx, in voxels
    sigma = SIGMA_ANGSTROM / VOXEL_SIZE_ANGSTROM
    half = int(np.ceil(np.abs(offsets).max() + 4 * sigma))
    n = 2 * half + 1
    axis = np.arange(n) - half
    volume = np.zeros((n, n, n))
    norm = (2 * np.pi * SIGMA_ANGSTROM**2) ** -1.5  # a unit Gaussian, per Å³
    for chunk in range(0, len(offsets), 2000):
        p = offsets[chunk : chunk + 2000]
        w = weight[chunk : chunk + 2000]
        g = [np.exp(-0.5 * ((axis[None, :] - p[:, k, None]) / sigma) ** 2) for k in range(3)]
        volume += np.einsum("a,az,ay,ax->zyx", w * norm, g[0], g[1], g[2], optimize=True)
    volume /= PROTEIN_ELECTRON_DENSITY
    # Smallest centred odd cube holding every value above the cutoff.
    distances = np.abs(np.argwhere(volume > CUTOFF) - half).max()
    keep = slice(half - distances, half + distances + 1)
    return volume[keep, keep, keep]


def main(source_dir: Path, output_dir: Path) -> None:
    """Write one ``NAME.npz`` per template and print a summary line for each."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, (filename, pdb_id, description, origin) in SOURCES.items():
        path = source_dir / filename
        reader = read_mmcif if ".cif" in path.suffixes else read_pdb
        xyz, weight = reader(path)
        density = render(xyz, weight).astype(np.float16)
        np.savez_compressed(
            output_dir / f"{name}.npz",
            density=density,
            voxel_size_angstrom=np.float64(VOXEL_SIZE_ANGSTROM),
            pdb_id=np.str_(pdb_id),
            description=np.str_(description),
            origin=np.str_(origin),
        )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        extent = np.ptp(xyz, axis=0).max()
        print(
            f"{name}: {pdb_id}, {len(xyz)} atoms, extent {extent:.0f} Å, box {density.shape[0]}, "
            f"max {float(density.max()):.2f}, sha256 {digest}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
