"""The drawing page's HTML, from one template (`static/page.html`) for its two hosts: `serve`, whose page sends
each drawing to the server, and the exported web app, whose page classifies in the browser. They differ only in
where the assets live, what the head links, the hint, the scripts and the footer; the board itself, with the
`data-testid` hooks the tests drive, is the same markup."""

from __future__ import annotations

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
