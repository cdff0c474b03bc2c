"""Host memory for XLA:CPU: glibc's malloc on transparent huge pages, for the training tools.

XLA:CPU allocates every step's activations and gradients (megabytes each) and frees them when the step ends.
glibc gives such blocks back to the kernel and faults them in again on the next step, one 4 KiB page at a
time: the `strong` preset's step took ~120,000 page faults a second, a fifth of its CPU time in the kernel.
With the glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc backs its memory with 2 MiB transparent
huge pages instead: 20x fewer faults, +26% training images/s for `strong` on a 2-core CPU (README,
"Performance"); results are bit-identical. glibc reads tunables only when a process starts, so the training
tools restart themselves once, before their heavy imports, with the tunable added to GLIBC_TUNABLES.
`MNIST_JAX_HUGE_PAGES=0` turns the restart off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "MNIST_JAX_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_environment(environ: Mapping[str, str], libc: tuple[str, str], thp_setting: str | None
                          ) -> dict[str, str] | None:
    """The environment to restart with, or None where there is nothing to gain or it is already set.

    `libc` is `platform.libc_ver()`; `thp_setting` the kernel's transparent-huge-page mode line (e.g.
    "always [madvise] never"), None where the kernel has none.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT, "1") == "0" or TUNABLE in tunables:
        return None
    name, version = libc
    if name != "glibc" or _version(version) < (2, 35):
        return None
    if thp_setting is None or "[never]" in thp_setting:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def restart_with_huge_pages() -> None:
    """Replaces this process with the same command under `huge_page_environment`, when that is not None.

    The process keeps its pid, arguments, open files and terminal; call it first thing in a tool's __main__.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        with open(THP_SETTING) as f:
            thp_setting: str | None = f.read()
    except OSError:
        thp_setting = None
    environ = huge_page_environment(os.environ, platform.libc_ver(), thp_setting)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return (0,)
