"""`python -m mnist_jax.serve --workdir DIR`: a drawing page that classifies digits live, and a JSON API.

The server itself is `app.serve`; this command parses its flags. It needs the `[serve]` extra, and without it says
so in one line (`extras`), so nothing here imports the web framework before that check.
"""

from __future__ import annotations

from mnist_jax import extras
from mnist_jax.cli import ArgumentParser, run_cli
from mnist_jax.serve.batching import DEFAULT_MAX_BATCH


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(text)
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(text)
    return int(text)


_positive_int.__name__ = "positive integer"
_port.__name__ = "port (0-65535)"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mnist_jax.serve", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--workdir", required=True, help="a training workdir (its checkpoints/ are served)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number (default: best)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=2_000_000,
                        help="largest accepted request body (default: 2000000)")
    parser.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
                        help=f"most requests predicted in one call (default: {DEFAULT_MAX_BATCH})")
    args = parser.parse_args(argv)
    extras.require("serve", "serve")
    from mnist_jax.serve.app import serve

    serve(args.workdir, args.host, args.port, args.checkpoint, args.max_body_bytes, args.max_batch)
    return 0


if __name__ == "__main__":
    run_cli(main)
