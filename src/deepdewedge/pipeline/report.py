"""One self-contained HTML page per dataset: status, timings and QC images of every tomogram.

The page embeds its images as ``data:`` URIs and carries its style inline, so it can be
mailed, copied off a cluster or opened from a laptop without the files it describes; links
to the output files are relative to the page's folder and work where the folder stays whole.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from deepdewedge.io.atomic import atomic_write

__all__ = ["STATUSES", "summary_counts", "write_report"]

log = logging.getLogger(__name__)

STATUSES = ("refined", "running", "pending", "failed")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Number of tomograms in each status, and in all.

    Parameters
    ----------
    rows : sequence of mapping
        One mapping per tomogram with a ``"status"`` key, one of :data:`STATUSES`.

    Returns
    -------
    dict of str to int
        One entry per status of :data:`STATUSES` (zero where none has it), then ``"total"``.
    """
    counts = dict.fromkeys(STATUSES, 0)
    for index, row in enumerate(rows):
        status = row.get("status")
        if status not in counts:
            raise ValueError(
                f"row {index} ({row.get('name')!r}): status must be one of "
                f"{', '.join(STATUSES)}, got {status!r}"
            )
        counts[status] += 1
    counts["total"] = len(rows)
    return counts


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    loss_curve_png: bytes | str | os.PathLike | None = None,
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """Write one self-contained HTML page about a dataset run, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The HTML file to write; an existing folder gets a ``report.html`` inside it.
    title : str
        Title of the page.
    rows : sequence of mapping
        One mapping per tomogram, in the order shown, with keys ``"name"`` (str) and
        ``"status"`` (one of :data:`STATUSES`) and optionally ``"error"`` (one line, shown
        for failed tomograms), ``"tilt_range_deg"`` (``[lo, hi]``), ``"seconds"`` (mapping
        of step name to seconds), ``"outputs"`` (mapping of label to file path; relative
        paths are taken from the current folder) and ``"images"`` (mapping of caption to PNG
        bytes or a PNG file, such as the result of :func:`tomogram_images`).
    loss_curve_png : bytes or str or os.PathLike, optional
        PNG bytes or a PNG file of the loss curve, shown under the summary.
    summary : mapping, optional
        Facts about the run (model checkpoint, epochs, times), shown as a table in the header.

    Returns
    -------
    Path
        The written HTML file.

    Notes
    -----
    The page needs no network and no JavaScript: images are embedded as base64 ``data:``
    URIs, the style sheet is inline and fonts are the system's. All text is HTML-escaped.
    Failed tomograms are listed at the top, tinted red in the table and boxed in red in
    their sections. With the default :func:`tomogram_images`, a typical tomogram adds about
    100 kB to the page (75 kB of PNG, base64-encoded), so that a page of hundreds of
    tomograms still opens in a few seconds.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    checked = [_checked_row(index, row) for index, row in enumerate(rows)]
    counts = summary_counts(checked)
    folder = path.parent.resolve()
    page = _page(
        str(title),
        checked,
        counts,
        None if loss_curve_png is None else _png_data(loss_curve_png, "loss curve"),
        dict(summary or {}),
        folder,
    )
    with atomic_write(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _checked_row(index: int, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its optional keys filled in, or a `ValueError` naming what is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index} must be a mapping, got {type(row).__name__}")
    if not str(row.get("name", "")):
        raise ValueError(f"row {index} has no name")
    checked = {
        "name": str(row["name"]),
        "status": row["status"],
        "error": " ".join(str(row.get("error") or "").split()),
        "tilt_range_deg": row.get("tilt_range_deg"),
        "seconds": dict(row.get("seconds") or {}),
        "outputs": dict(row.get("outputs") or {}),
        "images": dict(row.get("images") or {}),
    }
    tilt_range = checked["tilt_range_deg"]
    if tilt_range is not None and (
        isinstance(tilt_range, str) or len(tilt_range) != 2 or not all(map(_is_real, tilt_range))
    ):
        raise ValueError(
            f"row {index} ({checked['name']!r}): tilt_range_deg must be [lo, hi] in degrees, "
            f"got {tilt_range!r}"
        )
    return checked


def _is_real(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _png_data(source: bytes | str | os.PathLike, what: str) -> tuple[str, int, int] | None:
    """``(data URI, width, height)`` of PNG bytes or a PNG file; None for a missing file."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            log.warning("%s: cannot read the %s image (%s); left out", source, what, err.strerror)
            return None
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
        raise ValueError(f"the {what} image is not a PNG")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}", width, height


def _duration(seconds: Any) -> str:
    """Seconds as ``"12.3 s"``, ``"4 min 05 s"`` or ``"2 h 03 min"``; empty if unknown."""
    if not _is_real(seconds):
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _tilt_range(tilt_range: Sequence[float] | None) -> str:
    if tilt_range is None:
        return ""
    lo, hi = (float(a) for a in tilt_range)
    return f"{lo:+.4g}° to {hi:+.4g}°".replace("-", "−")


def _href(target: str | os.PathLike, folder: Path) -> str:
    """Link to `target` relative to `folder` (the page's), URL-quoted."""
    target = Path(os.path.abspath(target))
    try:
        relative = Path(os.path.relpath(target, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return target.as_uri()
    return quote(relative)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(status: str) -> str:
    return f'<span class="badge {status}">{status}</span>'


def _image_tag(data: tuple[str, int, int], alt: str) -> str:
    uri, width, height = data
    return (
        f'<img src="{uri}" width="{width}" height="{height}" alt="{_e(alt)}" '
        'loading="lazy" decoding="async">'
    )


_CAPTIONS = {
    "orthoslices": "central slices",
    "power_spectrum": "power spectrum (kz, kx)",
}

_STYLE = """
:root { --refined: #1a7f37; --running: #9a6700; --pending: #6e7781; --failed: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1120px; padding: 24px 28px 64px; color: #1f2328;
  background: #fff; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 16px; margin: 0 0 6px; display: flex; gap: 10px; align-items: center; }
a { color: #0550ae; }
.counts { font-size: 17px; margin: 4px 0 14px; }
.counts .n { font-weight: 600; }
.counts .failed { color: var(--failed); font-weight: 700; }
.alert { border: 2px solid var(--failed); background: #ffebe9; border-radius: 6px;
  padding: 8px 14px; margin: 12px 0; }
.alert strong { color: var(--failed); }
table { border-collapse: collapse; }
.facts td { padding: 2px 16px 2px 0; vertical-align: top; }
.facts td:first-child { color: #57606a; white-space: nowrap; }
.tomos { width: 100%; font-size: 14px; }
.tomos th { text-align: left; background: #f6f8fa; border-bottom: 2px solid #d0d7de;
  padding: 6px 10px; position: sticky; top: 0; }
.tomos td a { white-space: nowrap; margin-right: 6px; }
.tomos td { padding: 5px 10px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
.tomos td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.tomos tr.failed td { background: #ffebe9; }
.tomos tr.failed td:first-child { box-shadow: inset 4px 0 var(--failed); }
.error { color: var(--failed); font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 13px; overflow-wrap: anywhere; }
.badge { display: inline-block; min-width: 64px; text-align: center; padding: 1px 8px;
  border-radius: 10px; color: #fff; font-size: 12px; font-weight: 600; }
.badge.refined { background: var(--refined); }
.badge.running { background: var(--running); }
.badge.pending { background: var(--pending); }
.badge.failed { background: var(--failed); }
.tomo { margin: 18px 0; padding: 12px 16px; border: 1px solid #d0d7de; border-radius: 8px; }
.tomo.failed { border: 2px solid var(--failed); background: #fff8f8; }
.tomo .meta { color: #57606a; font-size: 13px; margin: 0 0 8px; }
.tomo .meta a { margin-right: 8px; }
.images { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; }
figcaption { color: #57606a; font-size: 12px; }
img { max-width: 100%; height: auto; display: block; }
.help { color: #424a53; font-size: 14px; max-width: 900px; }
.top { font-size: 12px; float: right; }
"""


def _page(
    title: str,
    rows: list[dict[str, Any]],
    counts: dict[str, int],
    loss_curve: tuple[str, int, int] | None,
    summary: dict[str, Any],
    folder: Path,
) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f'<header id="top"><h1>{_e(title)}</h1>',
        _counts_line(counts),
    ]
    failed = [(index, row) for index, row in enumerate(rows, 1) if row["status"] == "failed"]
    if failed:
        links = ", ".join(f'<a href="#t{index}">{_e(row["name"])}</a>' for index, row in failed)
        parts.append(f'<div class="alert"><strong>Failed:</strong> {links}</div>')
    if summary:
        facts = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary.items())
        parts.append(f'<table class="facts">{facts}</table>')
    parts.append("</header>")
    if loss_curve is not None:
        parts.append(
            f"<h2>Fitting</h2><figure>{_image_tag(loss_curve, 'loss curve')}"
            "<figcaption>loss against epoch</figcaption></figure>"
        )
    parts.append(_table(rows, folder))
    parts.append(
        '<h2 id="details">Tomograms</h2><p class="help"><b>Central slices</b>: one column each '
        "for the input tomogram, the refined tomogram and, where there is one, the difference "
        "of the two refined halves (which should show noise only); rows are the xy slice in "
        "the middle of the tomogram's thickness and the xz and yz slices through its centre, z "
        "pointing down. <b>Power spectrum</b>: kz vertical, kx horizontal; the missing wedge is "
        "the dark double cone around the vertical axis of the input, which refinement fills."
        "</p>"
    )
    parts.extend(_section(index, row, folder) for index, row in enumerate(rows, 1))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _counts_line(counts: dict[str, int]) -> str:
    shown = []
    for status in STATUSES:
        if counts[status] or status in ("refined", "pending", "failed"):
            css = ' class="failed"' if status == "failed" and counts[status] else ""
            shown.append(f'<span{css}><span class="n">{counts[status]}</span> {status}</span>')
    return f'<p class="counts">{counts["total"]} tomograms: {" · ".join(shown)}</p>'


def _outputs(outputs: dict[str, Any], folder: Path) -> str:
    return " ".join(
        f'<a href="{_e(_href(target, folder))}" title="{_e(target)}">{_e(label)}</a>'
        for label, target in outputs.items()
    )


def _table(rows: list[dict[str, Any]], folder: Path) -> str:
    steps = list(dict.fromkeys(step for row in rows for step in row["seconds"]))
    head = ["#", "tomogram", "status", "tilt range", *(f"{s} time" for s in steps), "files"]
    lines = [
        '<h2 id="tomograms">Overview</h2><table class="tomos"><thead><tr>',
        "".join(f"<th>{_e(h)}</th>" for h in head),
        "</tr></thead><tbody>",
    ]
    for index, row in enumerate(rows, 1):
        name = f'<a href="#t{index}">{_e(row["name"])}</a>'
        if row["status"] == "failed" and row["error"]:
            name += f'<div class="error">{_e(row["error"])}</div>'
        cells = [
            f'<td class="num">{index}</td>',
            f"<td>{name}</td>",
            f"<td>{_badge(row['status'])}</td>",
            f'<td class="num">{_e(_tilt_range(row["tilt_range_deg"]))}</td>',
            *(f'<td class="num">{_e(_duration(row["seconds"].get(s)))}</td>' for s in steps),
            f"<td>{_outputs(row['outputs'], folder)}</td>",
        ]
        lines.append(f'<tr class="{row["status"]}">{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _section(index: int, row: dict[str, Any], folder: Path) -> str:
    status, name = row["status"], row["name"]
    meta = []
    if row["tilt_range_deg"] is not None:
        meta.append(f"tilts {_e(_tilt_range(row['tilt_range_deg']))}")
    meta += [f"{_e(step)} {_e(_duration(s))}" for step, s in row["seconds"].items()]
    if row["outputs"]:
        meta.append(_outputs(row["outputs"], folder))
    parts = [
        f'<section class="tomo {status}" id="t{index}">',
        f'<a class="top" href="#tomograms">overview ↑</a><h3>{index}. {_e(name)} '
        f"{_badge(status)}</h3>",
    ]
    if meta:
        parts.append(f'<p class="meta">{" · ".join(meta)}</p>')
    if status == "failed":
        parts.append(f'<p class="error">{_e(row["error"] or "failed (no message recorded)")}</p>')
    figures = []
    for key, source in row["images"].items():
        data = _png_data(source, f"{key} of {name}")
        caption = _CAPTIONS.get(key, str(key))
        if data is None:
            figures.append(
                f"<figure><figcaption>{_e(caption)}: image missing</figcaption></figure>"
            )
        else:
            figures.append(
                f"<figure>{_image_tag(data, f'{caption} of {name}')}"
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    if figures:
        parts.append(f'<div class="images">{"".join(figures)}</div>')
    elif status in ("pending", "running"):
        parts.append(
            f'<p class="meta">{"running now" if status == "running" else "not refined yet"}</p>'
        )
    parts.append("</section>")
    return "\n".join(parts)
