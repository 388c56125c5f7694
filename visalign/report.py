"""Self-contained HTML run reports: image grids, line plots and tables, with no plotting library.

Plots are drawn with PIL so that a report needs nothing beyond the core dependencies, and every
image is embedded as base64, so the HTML file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(
    series: dict[str, list[tuple[float, float]]], title: str, y_label: str = "", size: tuple[int, int] = (520, 320)
) -> Image.Image:
    """Draws named (x, y) series on shared axes, with min/max tick labels and a legend."""
    width, height = size
    left, right, top, bottom = 58, 16, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    draw.text((left, 8), title, fill="black")
    if not points:
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y0) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        _, py = to_px(x0, y)
        draw.line([left, py, width - right, py], fill=(230, 230, 230))
        draw.text((4, py - 6), f"{y:.3g}", fill="black")
    for x in (x0, (x0 + x1) / 2, x1):
        px, _ = to_px(x, y0)
        draw.text((px - 8, height - bottom + 6), f"{x:.0f}", fill="black")
    draw.text((width // 2 - 30, height - 16), "iteration", fill="black")
    if y_label:
        draw.text((4, top - 22), y_label, fill="black")
    for i, (name, values) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.rectangle([width - right - 150, top + 6 + 14 * i, width - right - 140, top + 14 + 14 * i], fill=color)
        draw.text((width - right - 136, top + 3 + 14 * i), name, fill="black")
    return image


@dataclass
class Cell:
    """One image of a :class:`Gallery`: its caption and, optionally, a judgement (✓ / ✗ badge and border)."""

    image: Image.Image
    caption: str
    correct: bool | None = None
    note: str = ""  # e.g. which attributes were wrong, shown under the caption


@dataclass
class Gallery:
    """A grid of captioned images, each marked correct (green ✓) or not (red ✗) when judged."""

    cells: list[Cell]
    columns: int = 8


GALLERY_CSS = (
    ".gallery{display:grid;gap:6px;margin:8px 0}"
    ".cell{margin:0;padding:4px;border:3px solid #bbb;border-radius:6px;position:relative;background:#fff}"
    ".cell.ok{border-color:#2e9e44}.cell.bad{border-color:#d0342c}"
    ".cell img{display:block;width:100%;height:auto;margin:0;border:0}"
    ".badge{position:absolute;top:6px;right:6px;width:22px;height:22px;border-radius:11px;color:#fff;"
    "font-weight:bold;text-align:center;line-height:22px;font-size:15px}"
    ".ok .badge{background:#2e9e44}.bad .badge{background:#d0342c}"
    ".cell figcaption{font-size:12px;line-height:1.25;margin-top:3px}"
    ".cell .note{color:#d0342c;font-size:11px}"
)


def _gallery_html(gallery: Gallery) -> str:
    cells = []
    for cell in gallery.cells:
        state = {True: " ok", False: " bad", None: ""}[cell.correct]
        badge = {
            True: "<span class='badge' title='judged correct'>✓</span>",
            False: "<span class='badge' title='judged wrong'>✗</span>",
            None: "",
        }[cell.correct]
        note = f"<br><span class='note'>{html.escape(cell.note)}</span>" if cell.note else ""
        cells.append(
            f"<figure class='cell{state}'>{badge}<img src='{png_data_uri(cell.image)}' "
            f"alt='{html.escape(cell.caption, quote=True)}'>"
            f"<figcaption>{html.escape(cell.caption)}{note}</figcaption></figure>"
        )
    return (
        f"<div class='gallery' style='grid-template-columns:repeat({gallery.columns},1fr)'>" + "".join(cells) + "</div>"
    )


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_html_report(path: str, title: str, sections: list[tuple[str, list]]) -> str:
    """Writes an HTML file. Each section is (heading, items); an item is a PIL image, a
    :class:`Gallery` (captioned, judged images), a dict (rendered as a table), or a string (a
    paragraph, HTML-escaped).
    """
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{image-rendering:pixelated;margin:4px;border:1px solid #ddd}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "pre{background:#f6f6f6;padding:8px;overflow:auto}" + GALLERY_CSS + "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, Gallery):
                parts.append(_gallery_html(item))
            elif isinstance(item, Image.Image):
                parts.append(f"<img src='{png_data_uri(item)}' width='{item.width}' height='{item.height}'>")
            elif isinstance(item, dict):
                rows = "".join(
                    f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in item.items()
                )
                parts.append(f"<table>{rows}</table>")
            else:
                parts.append(f"<p>{html.escape(str(item))}</p>")
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
