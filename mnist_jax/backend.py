"""Everything that depends on the platform or the CPU, behind a small interface.

The training loop asks this module how to run: `use_every_cpu_core` (how many devices to make of a CPU),
`EpochRunner` (an epoch of a train step, as this platform runs it fastest) and `settle` (what to do after each
dispatched step). The training tools also restart once onto glibc's huge-page malloc (`restart_with_huge_pages`).
Nothing here changes what is computed, only how it is run; docs/performance.md says why each choice exists and
what it was measured to gain.

JAX is imported inside the functions that use it: the training tools call `restart_with_huge_pages` first thing,
before anything heavy is imported.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from mnist_jax.data import Split
    from mnist_jax.steps import TrainState

# ---------------------------------------------------------------------------------------------- host memory
# XLA:CPU allocates each step's activations and gradients and frees them when the step ends; glibc hands such blocks
# back to the kernel, which faults them in again one 4 KiB page at a time. With the tunable below (glibc >= 2.35)
# malloc backs its memory with transparent huge pages instead. Results are bit-identical.
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"
HUGE_PAGES_OPT_OUT = "MNIST_JAX_HUGE_PAGES"  # =0 turns the restart off
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_environment(environ: Mapping[str, str], libc: tuple[str, str], thp_setting: str | None
                          ) -> dict[str, str] | None:
    """The environment to restart with, or None where there is nothing to gain or it is already set.

    `libc` is `platform.libc_ver()`; `thp_setting` the kernel's transparent-huge-page mode line (e.g.
    "always [madvise] never"), None where the kernel has none.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(HUGE_PAGES_OPT_OUT, "1") == "0" or HUGE_PAGE_TUNABLE in tunables:
        return None
    name, version = libc
    if name != "glibc" or _version(version) < (2, 35):
        return None
    if thp_setting is None or "[never]" in thp_setting:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGE_TUNABLE}=1"]))}


def restart_with_huge_pages() -> None:
    """Replaces this process with the same command under `huge_page_environment`, when that is not None.

    glibc reads its tunables only when a process starts, hence the restart. The process keeps its pid, arguments,
    open files and terminal; the training tools call it first thing in their __main__.
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


# ---------------------------------------------------------------------------------------------- devices
def use_every_cpu_core() -> None:
    """One JAX CPU device per core, so data parallelism spreads each step over every core.

    XLA:CPU runs this model's convolutions on a single thread; split into one device per core, a batch's shards
    run concurrently. Call it before any JAX computation; it does nothing when XLA_FLAGS already sets a host
    device count or the backend is up.
    """
    import jax

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", len(os.sched_getaffinity(0)))
    except RuntimeError:  # JAX already started its backends: keep what it has.
        pass


def needs_lockstep(mesh: Mesh) -> bool:
    """Whether each step must finish before the next is dispatched.

    With several XLA:CPU devices, queueing many programs that contain cross-device all-reduces deadlocks (a
    rendezvous timeout aborts the process after a few dozen queued steps); GPUs and TPUs order their collectives
    and keep the asynchronous queue.
    """
    return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def settle(mesh: Mesh) -> Callable[[Any], Any]:
    """What to apply to each dispatched step's outputs on this mesh: wait for them where `needs_lockstep`, else
    nothing (the outputs are returned either way)."""
    if needs_lockstep(mesh):
        import jax

        return jax.block_until_ready
    return lambda outputs: outputs


def uses_on_device_epoch(platform_name: str) -> bool:
    """Whether a whole-epoch `lax.scan` beats dispatching each step from the host: on GPU and TPU it does; on
    XLA:CPU the scan runs several times slower."""
    return platform_name != "cpu"


# ---------------------------------------------------------------------------------------------- XLA:CPU options
# XLA:CPU leaves bias adds, pooling gradients and the optax update as separate loops; YNNPACK library fusions fold
# them into multi-threaded dot and convolution kernels. Dots, elementwise ops and reductions pay on every CPU
# measured. YNNPACK's own convolutions pay only on AMD CPUs with AVX-512, and there not for batch-norm models; on
# other CPUs they are many times slower than XLA's. The rule was tuned on shared machines, so the user can
# override it: MNIST_JAX_CPU_FUSIONS, or the same XLA option in XLA_FLAGS, which then wins.
_YNN_FUSIONS = ("DOT", "ELTWISE", "REDUCE")
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
FUSIONS_VARIABLE = "MNIST_JAX_CPU_FUSIONS"  # auto (the rule below), none, or kinds: dot,eltwise,reduce,convolution
FUSION_KINDS = {"dot": "DOT", "eltwise": "ELTWISE", "reduce": "REDUCE", "convolution": "INDIVIDUAL_CONVOLUTION"}


def ynn_fusion_options(*kinds: str) -> dict[str, str]:
    """XLA:CPU compiler options that put these kinds of op (DOT, ELTWISE, REDUCE, INDIVIDUAL_CONVOLUTION) into
    YNNPACK library fusions; no kinds turns YNNPACK fusions off."""
    return {YNN_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in kinds)}


def chosen_fusions(environ: Mapping[str, str]) -> tuple[str, ...] | None:
    """The YNNPACK fusion kinds MNIST_JAX_CPU_FUSIONS asks for: None for `auto` (or unset: the CPU rule), () for
    `none`; a UserError for anything else than a comma-separated list of dot, eltwise, reduce, convolution."""
    from mnist_jax.config import UserError

    text = environ.get(FUSIONS_VARIABLE, "").strip().lower()
    if text in ("", "auto"):
        return None
    if text == "none":
        return ()
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in FUSION_KINDS]
    if unknown:
        raise UserError(f"{FUSIONS_VARIABLE}={environ[FUSIONS_VARIABLE]!r}: expected auto, none or a comma-separated "
                        f"list of {', '.join(FUSION_KINDS)}")
    return tuple(FUSION_KINDS[name] for name in dict.fromkeys(names))


def _cpuinfo_value(key: str, cpuinfo_path: str) -> str | None:
    """The value of the first `key : value` line of /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU; empty where it does not say (not Linux)."""
    return frozenset((_cpuinfo_value("flags", cpuinfo_path) or "").split())


def cpu_vendor(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor as the kernel reports it (`AuthenticAMD`, `GenuineIntel`); '' where it does not say."""
    return _cpuinfo_value("vendor_id", cpuinfo_path) or ""


def compiler_options(platform_name: str, batch_norm: bool = False, flags: frozenset[str] | None = None,
                     vendor: str | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """XLA options for the step functions on this CPU (`flags` and `vendor`, default this machine's; `environ`,
    default this process's); none on GPU/TPU.

    The user's choice first: XLA_FLAGS that set the YNNPACK fusion option win (no option is passed, so XLA reads
    theirs), then MNIST_JAX_CPU_FUSIONS. `auto` (the default) is the rule: YNNPACK fusions of dots, elementwise ops
    and reductions; plus convolutions on AMD CPUs with AVX-512, where batch-norm models keep XLA's defaults
    instead. The rule depends on the CPU alone, never on a timing, so a seed gives one result on a machine. A CPU
    whose flags are unknown (not Linux, ARM) is treated as that AMD one.
    """
    if platform_name != "cpu":
        return {}
    environ = os.environ if environ is None else environ
    if YNN_FUSION_OPTION in environ.get("XLA_FLAGS", ""):
        return {}
    chosen = chosen_fusions(environ)
    if chosen is not None:
        return ynn_fusion_options(*chosen)
    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    if not flags or ("avx512f" in flags and vendor == "AuthenticAMD"):
        return {} if batch_norm else ynn_fusion_options(*_YNN_FUSIONS, "INDIVIDUAL_CONVOLUTION")
    return ynn_fusion_options(*_YNN_FUSIONS)


def compile_for_backend(jitted: Any, state: TrainState, *example_args: Any) -> Any:
    """Ahead-of-time compiles a jitted step for these arguments with this platform's XLA options for the model."""
    import jax

    options = compiler_options(jax.default_backend(), batch_norm=bool(state.batch_stats))
    return jitted.lower(state, *example_args).compile(options)


# ---------------------------------------------------------------------------------------------- epochs
def scan_epoch(train_step: Callable) -> Callable:
    """(state, split, permutation) -> (state, stacked metrics): the epoch as one jitted `lax.scan` of `train_step`
    over the permutation's rows, on the device, the state donated."""
    import jax

    from mnist_jax.steps import take_batch

    def epoch(state, split, permutation):
        return jax.lax.scan(lambda s, indices: train_step(s, take_batch(split, indices)), state, permutation)

    return jax.jit(epoch, donate_argnums=0)


class EpochRunner:
    """Runs epochs of one jitted train step ((state, batch) -> (state, metrics), state donated) on a mesh.

    GPU and TPU run the epoch as one `scan_epoch` on the device. XLA:CPU dispatches each step from the host
    instead, compiled ahead of time with this CPU's options (`compile_for_backend`) and `settle`d after each step.
    Either way `run` returns the new state and each step's metrics as host arrays.
    """

    def __init__(self, train_step: Callable, state: TrainState, split: Split, batch_size: int, mesh: Mesh,
                 progress: bool = False) -> None:
        import jax

        from mnist_jax import sharding, steps

        self._progress = progress
        self._on_device = uses_on_device_epoch(mesh.devices.flat[0].platform)
        if self._on_device:
            self._epoch = scan_epoch(train_step)
            return
        # Each device gathers its own slice of the batch from its copy of the split, so no process sends another
        # any images: a step's indices are split over the mesh like the batch, each process placing its part.
        self._batch_sharding = sharding.batch_sharded(mesh)
        self._take = jax.jit(steps.take_batch, out_shardings=self._batch_sharding)
        self._step = compile_for_backend(train_step, state, self._take(split, np.arange(batch_size)))
        self._settle = settle(mesh)

    def run(self, state: TrainState, split: Split, permutation: Any, description: str = ""
            ) -> tuple[TrainState, dict[str, np.ndarray]]:
        """One epoch over `permutation` (steps, batch_size): the new state and each step's metrics."""
        import jax

        if self._on_device:
            state, metrics = self._epoch(state, split, permutation)
            return state, {name: np.asarray(values) for name, values in jax.device_get(metrics).items()}
        from tqdm import tqdm

        rows = np.asarray(permutation)  # each step's indices go to the devices with it: no slicing dispatch
        collected = []
        # disable=None: a bar only where stderr is a terminal; redirected to a file, its frames would fill the log.
        for indices in tqdm(rows, desc=description, leave=False, disable=None if self._progress else True,
                            unit="step", file=sys.stderr, mininterval=1.0):
            state, metrics = self._step(state, self._take(split, jax.device_put(indices, self._batch_sharding)))
            collected.append(self._settle(metrics))
        collected = jax.device_get(collected)
        return state, {name: np.asarray([m[name] for m in collected]) for name in collected[0]}
