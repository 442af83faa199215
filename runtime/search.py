"""How `interactive search` shows results: a terminal table, JSON lines, a contact sheet PNG.

Contact sheet layout (deterministic, in pixels): one row per query that was searched, the query's
thumbnail then its k hits, each cell THUMB x THUMB with a LABEL_HEIGHT strip below it (the rank
and score, then the file name), GAP between cells and around the sheet:

    width  = (k + 1) * THUMB + (k + 2) * GAP
    height = rows * (THUMB + LABEL_HEIGHT) + (rows + 1) * GAP

A thumbnail keeps its aspect ratio, centred in its cell; an image that cannot be read shows as a
grey cell saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import ImageError, load_image
from .knn import Hit, SearchResults
from .viz import _fit, save_png

THUMB = 128
LABEL_HEIGHT = 30
GAP = 4
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
TEXT = (0, 0, 0)
QUERY_TEXT = (0, 0, 160)
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def table_lines(results: SearchResults) -> list[str]:
    """query, rank, score, path, id: a header and one aligned line per hit."""
    rows = [["query", "rank", "score", "path", "id"]]
    for i in range(len(results)):
        for hit in results.hits(i):
            rows.append([results.queries[i], str(hit.rank), f"{hit.score:.4f}", hit.path,
                         hit.id or ""])  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return ["  ".join([*(r[c].ljust(widths[c]) for c in range(4)), r[4]]).rstrip() for r in rows]


def json_lines(results: SearchResults) -> list[str]:
    """One JSON object per hit: query, rank, score, path, id, row."""
    return [
        json.dumps(
            {
                "query": results.queries[i],
                "rank": h.rank,
                "score": round(h.score, 6),
                "path": h.path,
                "id": h.id,
                "row": h.row,
            }
        )  # fmt: skip
        for i in range(len(results))
        for h in results.hits(i)
    ]


def sheet_size(queries: int, k: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of `queries` rows of k hits."""
    return (k + 1) * THUMB + (k + 2) * GAP, queries * (THUMB + LABEL_HEIGHT) + (queries + 1) * GAP


def contact_sheet(
    results: SearchResults, query_images: Sequence[object | None], k: int
) -> Image.Image:
    """One row per query searched: `query_images[i]` (a path, bytes, array... or None: a blank
    cell) then its hits' files (`path_bytes` or `path`), with rank, score and name."""
    shown = [i for i in range(len(results)) if i not in results.errors]
    sheet = Image.new("RGB", sheet_size(len(shown), k), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, i in enumerate(shown):
        y = GAP + row * (THUMB + LABEL_HEIGHT + GAP)
        _cell(sheet, draw, font, GAP, y, query_images[i],
              ("query", _name(results.queries[i])), QUERY_TEXT)  # fmt: skip
        for hit in results.hits(i):
            x = GAP + hit.rank * (THUMB + GAP)
            label = (f"#{hit.rank} {hit.score:.3f}", _name(hit.path))
            _cell(sheet, draw, font, x, y, _hit_source(hit), label, TEXT)
    return sheet


def save_contact_sheet(
    results: SearchResults, query_images: Sequence[object | None], k: int,
    out: str | os.PathLike[str],
) -> Path:  # fmt: skip
    """`contact_sheet` saved as a PNG at `out`, atomically."""
    return save_png(contact_sheet(results, query_images, k), out)


def _hit_source(hit: Hit) -> str:
    """The hit's file: `path_bytes` (a name that is not UTF-8) as the str Python opens it by."""
    return os.fsdecode(hit.path_bytes) if hit.path_bytes else hit.path


def _name(path: str) -> str:
    return os.path.basename(path) or path


def _cell(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, font: Font,
    x: int, y: int, source: object | None, label: tuple[str, str], colour: tuple[int, int, int],
) -> None:  # fmt: skip
    thumb, problem = _thumbnail(source)
    if thumb is None:
        draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill=MISSING)
        draw.text((x + 4, y + THUMB // 2 - 6), _fit(draw, problem, font, THUMB - 8), TEXT, font)
    else:
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
    for line, text in enumerate(label):
        draw.text((x + 2, y + THUMB + 2 + 14 * line), _fit(draw, text, font, THUMB - 4), colour,
                  font)  # fmt: skip


def _thumbnail(source: object | None) -> tuple[Image.Image | None, str]:
    """A THUMB-bounded thumbnail of `source`, or (None, why not)."""
    if source is None:
        return None, "(vector)"
    try:
        pixels = load_image(source, min_size=(THUMB, THUMB))  # type: ignore[arg-type]
    except (ImageError, OSError, ValueError) as err:
        return None, "unreadable" if not str(err) else str(err).rsplit(": ", 1)[-1]
    picture = Image.fromarray(np.ascontiguousarray(pixels))
    picture.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    return picture, ""
