"""Serving (`python -m mnist_jax.serve`, the `[serve]` extra): the drawing page and its JSON API.

`app` is the FastAPI server, `batching` its micro-batcher, `page` the drawing page's HTML, rendered from `static/`
(whose page, script and style the exported web app shares). Importing this package imports no web framework.
"""
