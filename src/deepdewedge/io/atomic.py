"""Atomic writes: a temporary file beside the target, renamed over it when complete."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepdewedge.io.errors import InputError


def output_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents) for output, or raise a one-line `InputError` why not.

    Parameters
    ----------
    folder
        Folder that results will be written into.

    Returns
    -------
    Path
        The folder, which now exists.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next(
            (p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None
        )
        if blocker is not None:
            raise InputError(
                f"{folder}: cannot create this output folder, {blocker} is a file; choose "
                "another output folder or move that file"
            ) from None
        raise InputError(
            f"{folder}: cannot create this output folder ({err.strerror}); choose a "
            "writable output folder"
        ) from None
    return folder


@contextmanager
def atomic_write(
    path: str | os.PathLike, *, fix: str = "free disk space or choose another output folder"
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds.

    A reader never sees a half-written file, and an interrupted write leaves the old file in
    place. Folders are created as needed; an `OSError` (full disk, permissions) becomes a
    one-line `InputError` naming the file and ending with `fix`.
    """
    path = Path(path)
    output_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(
            f"{path.parent}: cannot write in this folder ({err.strerror}); {fix}"
        ) from None
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write it ({err.strerror}); {fix}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes of `path` left beside it.

    A write that was killed (not merely failed) cannot remove its hidden ``.{name}.*.tmp``
    file; for large volumes these are worth removing before writing `path` again. Only
    temporaries of this one target are touched, so call it just before writing `path`, when
    no other process is writing it.

    Parameters
    ----------
    path
        The target file whose temporaries are removed.

    Returns
    -------
    list[Path]
        The removed files.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    removed = []
    for stale in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        if "." not in stale.name[len(prefix) : -len(".tmp")]:  # not another target's
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed
