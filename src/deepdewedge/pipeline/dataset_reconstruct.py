"""A dataset of tilt series: each one reconstructed once into the project, then a tomogram.

The options of ``ddw reconstruct`` (thickness, binning, filters, ...) come from the config's
``reconstruct`` section; the files of each tilt series from the folder
(:mod:`deepdewedge.io.tilt_series_folder`). The tomograms go to
``{project_dir}/tomograms/{name}_{tomo0,tomo1,full}.mrc`` with their record; a tilt series
whose record is there is not reconstructed again, so a killed run goes on where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deepdewedge.config import step_config
from deepdewedge.io.dataset import TomogramEntry, recorded_tilt_range
from deepdewedge.io.errors import InputError
from deepdewedge.io.tilt_series_folder import TiltSeriesFiles

log = logging.getLogger(__name__)


def tomograms_dir(project_dir: Path) -> Path:
    """Where a dataset run writes the tomograms it reconstructs."""
    return Path(project_dir) / "tomograms"


def reconstruct_series(
    series: TiltSeriesFiles,
    project_dir: Path,
    config_file: Path | None,
    *,
    overwrite: bool = False,
) -> TomogramEntry:
    """Reconstruct one tilt series unless done before; its tomogram, or the error why not."""
    from deepdewedge.pipeline.reconstruction import reconstruct

    out_dir = tomograms_dir(project_dir)
    stem = series.tilt_series.stem
    files = {k: out_dir / f"{stem}_{k}.mrc" for k in ("tomo0", "tomo1", "full")}
    record = out_dir / f"{stem}_reconstruct.json"
    if overwrite or not (record.exists() and all(p.exists() for p in files.values())):
        try:
            config = step_config(
                "reconstruct",
                config_file=config_file,
                overrides={
                    **series.reconstruct_options(),
                    "project_dir": project_dir,
                    "output_dir": out_dir,
                    "overwrite": True,
                },
            )
            log.info("reconstructing %s", series.tilt_series)
            reconstruct(config)  # type: ignore[arg-type]
        except InputError as err:
            return TomogramEntry(series.name, None, None, error=str(err))
    return TomogramEntry(
        series.name,
        files["tomo0"],
        files["tomo1"],
        full=files["full"],
        tilt_range_deg=recorded_tilt_range(files["tomo0"]),
    )
