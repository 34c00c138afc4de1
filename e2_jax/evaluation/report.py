"""An evaluation's report, written one way: `report.json` (the numbers), `report.md` (the
tables) and `report.html` (one self-contained page: the tables, then pictures, every image
inlined as a PNG data URI, no server and no file beside it).

A report's page is a list of blocks: `Text`, `Table` (also its Markdown) and `Gallery` (a row of
captioned images, a marked one framed in green, the others in grey).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from e2_jax import storage


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; each cell as text."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    heading: int = 0  # 0: a paragraph; 1-3: a heading of that level


@dataclasses.dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def markdown(self) -> str:
        return markdown_table(self.header, self.rows)


@dataclasses.dataclass(frozen=True)
class Figure:
    png: bytes
    caption: str  # a line break in it is one on the page
    marked: bool = False  # the right answer


@dataclasses.dataclass(frozen=True)
class Gallery:
    title: str
    figures: tuple[Figure, ...]
    width: int = 128  # each image's width on the page, in CSS pixels (small images are enlarged)


def png(image: np.ndarray | Any, size: int | None = None) -> bytes:
    """A uint8 [H, W, 3] array or a PIL image as PNG bytes, its longer side at most `size`."""
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if size and max(picture.size) > size:
        scale = size / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    out = io.BytesIO()
    picture.save(out, format="png")
    return out.getvalue()


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,td:nth-child(2){text-align:left}
.gallery{display:flex;gap:10px;flex-wrap:wrap;margin:0.5em 0 1.5em}
figure{margin:0;text-align:center;font-size:12px}figcaption{overflow-wrap:anywhere}
figure img{border:4px solid #ddd;display:block;margin:auto;image-rendering:pixelated}
figure.marked img{border-color:#2a2}"""


def html_page(title: str, blocks: Sequence[Text | Table | Gallery]) -> str:
    """One self-contained HTML page."""
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Text):
            tag = f"h{block.heading + 1}" if block.heading else "p"
            out.append(f"<{tag}>{html.escape(block.text)}</{tag}>")
        elif isinstance(block, Table):
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in block.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block.rows]
            out.append("</table>")
        else:
            out.append(f"<h3>{html.escape(block.title)}</h3><div class='gallery'>" if block.title
                       else "<div class='gallery'>")
            for figure in block.figures:
                data = base64.b64encode(figure.png).decode("ascii")
                caption = html.escape(figure.caption)
                out.append(f"<figure class='{'marked' if figure.marked else ''}' style='width:{block.width + 8}px'>"
                           f"<img alt='{caption.splitlines()[0] if caption else ''}' width='{block.width}' "
                           f"src='data:image/png;base64,{data}'>"
                           f"<figcaption>{caption.replace(chr(10), '<br>')}</figcaption></figure>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write(directory: str | os.PathLike, report: dict | None = None, markdown: str | None = None, *,
          page: tuple[str, Sequence[Text | Table | Gallery]] | None = None) -> dict[str, Any]:
    """Writes what is given of `report.json` (`report`), `report.md` (`markdown`) and
    `report.html` (`page`: its title and blocks) into `directory` (a local folder or a bucket);
    returns their paths by suffix."""
    directory = storage.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for suffix, text in (("json", json.dumps(report, indent=2, sort_keys=True) + "\n" if report is not None else None),
                         ("md", markdown), ("html", html_page(*page) if page else None)):
        if text is not None:
            path = directory / f"report.{suffix}"
            path.write_text(text)
            written[suffix] = path
    return written
