"""The drawing page's HTML, from one template (`static/page.html`) for its two hosts: `serve`, whose page sends
each drawing to the server, and the exported web app, whose page classifies in the browser. They differ only in
where the assets live, what the head links, the hint, the scripts and the footer; the board itself, with the
`data-testid` hooks the tests drive, is the same markup."""

from __future__ import annotations

import io
from importlib import resources
from string import Template
from typing import Sequence

STATIC = resources.files("mnist_jax.serve") / "static"  # the page's assets, shared with the exported web app
TEMPLATE = STATIC / "page.html"


def render(*, assets: str, hint: str, scripts: Sequence[str], footer: str, head: Sequence[str] = ()) -> str:
    """The page, its stylesheet and `scripts` (file names) loaded from the `assets` prefix ("/static/" or "");
    `head`: extra <head> lines; `footer`: HTML."""
    return Template(TEMPLATE.read_text()).substitute(
        assets=assets, hint=hint, footer=footer,
        head="".join(f"  {line}\n" for line in head),
        scripts="".join(f'  <script src="{assets}{name}"></script>\n' for name in scripts),
    )


def icon(size: int, stroke: int):
    """The page's icon, `size` pixels square (a PIL image): a white 7 on the page's dark ink colour."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (29, 36, 48))
    points = [(0.3, 0.28), (0.7, 0.28), (0.45, 0.75)]
    ImageDraw.Draw(image).line([(x * size, y * size) for x, y in points], fill=(255, 255, 255), width=stroke,
                               joint="curve")
    return image


def favicon() -> bytes:
    """serve's /favicon.ico (browsers ask for it unbidden): the icon at 16 to 64 px."""
    buffer = io.BytesIO()
    icon(64, 64 // 10).save(buffer, format="ICO", sizes=[(16, 16), (32, 32), (64, 64)])
    return buffer.getvalue()
