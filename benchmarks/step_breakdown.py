"""Where one training step's time goes, per operation: ours (XLA:CPU, from a `jax.profiler` trace) and, for the
same CNN, Keras on TensorFlow (oneDNN's verbose log of every primitive it runs).

    python benchmarks/step_breakdown.py                       # batch 128, one device per core, as train runs
    python benchmarks/step_breakdown.py --cpu-devices 1 --markdown

Ours: the step `train` compiles (`steps.make_train_step` of the default preset with the benchmark's SGD, compiled
with `backend.compile_for_backend`) runs `--steps` times under `jax.profiler.trace`; each of XLA:CPU's thunks is a
trace event named after its HLO instruction, which the compiled program's text maps to what it computes (the layer
and direction in the instruction's `op_name`, the operation its fused computation contains). Rows give
milliseconds per step summed over the devices (each device is a core), and the share of the devices' busy time.
The last rows say how long each device was busy per step against the step's wall time: the rest is waiting, for the
other device at the gradient all-reduce or for the host.

TensorFlow: `keras_worker.py` with ONEDNN_VERBOSE=1 runs the same steps; oneDNN reports each primitive's time
(convolutions forward, backward-data and backward-weights, pooling, inner products, eltwise), which map to layers
by their shapes. TensorFlow's own kernels (bias gradients, the momentum update, the loss) are not oneDNN
primitives: they are the step's wall time minus the primitives' time, printed as one row.
"""

from __future__ import annotations

if __name__ == "__main__":  # as `python -m mnist_jax.train` runs: glibc's malloc on huge pages (mnist_jax.backend)
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax

from mnist_jax import backend, sharding, steps
from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax.config import PRESETS
from mnist_jax.model import build_model
from mnist_jax.optim import make_optimizer
from fusion_choice import random_batches
from step_throughput import MEAN, NUM_EXAMPLES, STD, KerasWorker, synthetic_split

LAYER = re.compile(r"/(conv\d+_\d+|dense\d+|head)/")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.*?) ([\w-]+)\((.*)$")
# The default model's activations by their trailing dimensions (any batch): which layer an unnamed op serves.
ACTIVATIONS = {(28, 28, 32): "conv1_1", (14, 14, 32): "conv1_1", (14, 14, 64): "conv2_1", (7, 7, 64): "conv2_1",
               (256,): "dense1", (10,): "head"}
WEIGHTS = {(3, 3, 1, 32): "conv1_1", (1, 3, 3, 32): "conv1_1", (3, 3, 32, 64): "conv2_1", (32, 3, 3, 64): "conv2_1",
           (3136, 256): "dense1", (256, 3136): "dense1", (256, 10): "head", (10, 256): "head",
           (32,): "conv1_1", (64,): "conv2_1", (256,): "dense1", (10,): "head"}


@dataclasses.dataclass
class Instruction:
    name: str
    dims: tuple[int, ...]  # the output's dimensions ((): a tuple or a scalar)
    opcode: str
    operands: list[str]
    body: list[str]  # its line and, for a fusion, its fused computation's lines

    @property
    def opcodes(self) -> set[str]:
        return {m.group(3) for line in self.body for m in [INSTRUCTION.match(line)] if m}

    @property
    def op_names(self) -> list[str]:
        return [m.group(1) for line in self.body for m in [re.search(r'op_name="([^"]+)"', line)] if m]


def parse_entry(hlo_text: str) -> dict[str, Instruction]:
    """The entry computation's instructions (each a thunk of XLA:CPU's runtime), with their fused bodies."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.-]+) \(.*\{$", line)
        if header:
            current = "ENTRY" if header.group(1) else header.group(2)
            computations[current] = []
        elif current and line.strip() == "}":
            current = None
        elif current:
            computations[current].append(line)
    instructions = {}
    for line in computations.get("ENTRY", []):
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        dims = re.fullmatch(r"\w+\[([\d,]*)\](?:\{.*\})?", shape)
        called = re.search(r"(?:calls|to_apply)=%([\w.-]+)", rest)
        operands = re.findall(r"%([\w.-]+)", re.split(r"\), \w+=", rest)[0])
        instructions[name] = Instruction(
            name, tuple(int(d) for d in dims.group(1).split(",") if d) if dims else (), opcode, operands,
            [line] + (computations.get(called.group(1), []) if called and opcode == "fusion" else []))
    return instructions


def instruction_roles(hlo_text: str) -> dict[str, str]:
    """Entry instruction name -> what it computes for the model, e.g. "conv2_1 backward: weight gradient"."""
    instructions = parse_entry(hlo_text)
    roles: dict[str, str] = {}

    def consumer_role(name: str) -> str:
        users = [i for i in instructions.values() if name in i.operands]
        return role(users[0]) if users else "unused"

    def role(i: Instruction) -> str:
        if i.name in roles:
            return roles[i.name]
        ops, names = i.opcodes - {"parameter", "constant", "bitcast", "fusion"}, i.op_names
        layers = [m.group(1) for text in names for m in [LAYER.search(text)] if m]
        backward = any("transpose(jvp(CNN))" in text for text in names)
        forward = not backward and any("jvp(CNN)" in text for text in names)
        direction = "backward" if backward else "forward" if forward else ""
        tail = i.dims[1:] if len(i.dims) > 1 else i.dims
        if i.opcode == "all-reduce":
            found = "gradients: all-reduce across devices"
        elif ops == {"broadcast"}:
            found = f"{consumer_role(i.name)} (a constant written out as a tensor)"
        elif ops and ops <= {"transpose", "copy", "reverse"}:
            what = "the kernel flipped and transposed" if "reverse" in ops else "a layout copy"
            found = f"{layers[0]} {direction}: {what}" if layers and direction else \
                f"{consumer_role(i.name)} (its operand's layout)"
        elif "convolution" in ops or "dot" in ops:
            layer = layers[0] if layers else WEIGHTS.get(i.dims) or ACTIVATIONS.get(tail, "?")
            kind = "convolution" if "convolution" in ops else "matmul"
            if not direction and i.dims in WEIGHTS:  # a weight gradient XLA rewrote, losing its op_name
                backward, direction = True, "backward"
            if backward:
                kind += ": weight gradient" if i.dims in WEIGHTS else ": input gradient"
            found = f"{layer} {direction}: {kind}" + (" + bias" if forward and "add" in ops else "")
        elif "reduce-window" in ops and (len(i.dims) == 4 or any(
                len(instructions[o].dims) == 4 for o in i.operands if o in instructions)):
            shapes = [tail] + [instructions[o].dims[1:] for o in i.operands if o in instructions]
            layer = next((ACTIVATIONS[s] for s in shapes if len(s) == 3 and s in ACTIVATIONS), "?")
            found = f"{layer} {direction}: avg-pool" + (" + relu" if "maximum" in ops else "")
        elif "select" in ops and "compare" in ops and backward:
            found = f"{ACTIVATIONS.get(tail, '?')} backward: relu"
        elif "maximum" in ops and forward:
            found = f"{ACTIVATIONS.get(tail, '?')} forward: relu"
        elif "reduce" in ops and backward and layers:
            found = f"{layers[0]} backward: bias gradient"
        elif i.dims in WEIGHTS and names and not any("jvp" in text for text in names):
            found = f"{WEIGHTS[i.dims]} optimiser update"
        elif "convert" in ops and forward:
            found = "input: uint8 -> normalised float32"
        elif names or ops:
            found = "loss, its gradient, metrics"
        else:
            found = "other"
        roles[i.name] = found
        return found

    for instruction in instructions.values():
        role(instruction)
    return roles


def our_breakdown(batch_size: int, steps_measured: int) -> dict:
    config = dataclasses.replace(PRESETS["default"], batch_size=batch_size, optimizer="sgd", learning_rate=0.1,
                                 schedule="constant")
    mesh = sharding.make_mesh(None, batch_size)
    model = build_model(config, 10, MEAN, STD)
    state = steps.create_train_state(model, make_optimizer(config, NUM_EXAMPLES // batch_size),
                                     jax.random.PRNGKey(0), (28, 28, 1))
    state = jax.device_put(state, sharding.replicated(mesh))
    split = jax.device_put(synthetic_split(NUM_EXAMPLES), sharding.replicated(mesh))
    batches = random_batches(split, mesh, batch_size, steps_measured)
    step = steps.make_train_step(config)
    compiled = backend.compile_for_backend(step, state, batches[0])
    settle = backend.settle(mesh)
    def run_steps(state):
        for batch in batches:
            state, metrics = compiled(state, batch)
            settle(metrics)
        return jax.block_until_ready(state)

    state = run_steps(state)  # warm-up
    start = time.perf_counter()
    state = run_steps(state)
    wall = (time.perf_counter() - start) / steps_measured  # without the profiler, which slows the host's side
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            state = run_steps(state)
        (trace_file,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(trace_file) as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    roles = instruction_roles(compiled.as_text())
    by_role: collections.Counter = collections.Counter()
    busy_by_thread: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in roles:
            by_role[roles[event["name"]]] += event["dur"] / 1000 / steps_measured
            busy_by_thread[event["tid"]] += event["dur"] / 1000 / steps_measured
    return {"by_role": by_role, "busy_by_thread": sorted(busy_by_thread.values(), reverse=True),
            "wall_ms": wall * 1000, "devices": mesh.size}


# ---------------------------------------------------------------------------------------------- TensorFlow
ONEDNN_LINE = re.compile(r"^onednn_verbose,(?:v\d+,)?(?:primitive,)?exec,cpu,([\w-]+),([^,]*),([\w_]+),.*?,([^,]+),"
                         r"([\d.]+)$")


def keras_breakdown(batch_size: int, steps_measured: int) -> dict:
    """oneDNN's primitive times per step of the Keras model, by layer and kind, and the step's wall time."""
    command, env = KerasWorker.command(batch_size, steps_measured, ONEDNN_VERBOSE="1")
    commands = "window\n" * 2 + "quit\n"  # the first window warms up; the second is measured
    result = subprocess.run(command, input=commands, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"keras_worker.py failed: {result.stderr[-2000:]}")
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    lines = [line for line in result.stdout.splitlines() if line.startswith("onednn_verbose")]
    # The measured window's primitives: the last (steps + 1) steps' worth; its first step is not timed.
    executions = [m.groups() for line in lines for m in [ONEDNN_LINE.match(line)] if m]
    per_step = len(executions) // (2 * (steps_measured + 1)) if executions else 0
    window = executions[-per_step * steps_measured:] if per_step else []
    by_role: collections.Counter = collections.Counter()
    names = {"gemm_api": "dense1, head backward: matmuls (gemm)", "reorder": "layout reorders",
             "pooling": "avg-pool {direction}"}
    for kind, implementation, direction, shape, milliseconds in window:
        role = names[kind].format(direction=direction) if kind in names else \
            f"{keras_layer(kind, shape)} {direction}: {kind}"
        by_role[role] += float(milliseconds) / steps_measured
    seconds = answers[-1]["seconds"]
    return {"by_role": by_role, "wall_ms": seconds * 1000 / steps_measured}


def keras_layer(kind: str, shape: str) -> str:
    """The layer a oneDNN primitive belongs to, from its problem descriptor (e.g. `mb128_ic1oc32_ih28...`)."""
    channels = re.search(r"ic(\d+)oc(\d+)", shape)
    if kind == "convolution" and channels:
        return {("1", "32"): "conv1_1", ("32", "64"): "conv2_1"}.get(channels.groups(), shape)
    if kind == "inner_product" and channels:
        return {("3136", "256"): "dense1", ("256", "10"): "head"}.get(channels.groups(), shape)
    return "-"


# ---------------------------------------------------------------------------------------------- output
def table(title: str, breakdown: dict, markdown: bool, wall: str) -> list[str]:
    rows = breakdown["by_role"].most_common()
    total = sum(breakdown["by_role"].values())
    lines = [f"{title}: {breakdown['wall_ms']:.1f} ms per step ({wall})"]
    if markdown:
        lines += ["", "| operation | ms per step | share |", "| --- | ---: | ---: |"]
        lines += [f"| {role} | {ms:.2f} | {ms / total:.0%} |" for role, ms in rows]
    else:
        lines += [f"  {ms:8.2f} ms  {ms / total:4.0%}  {role}" for role, ms in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (after warm-up)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="split the CPU into this many JAX devices (default: one per core, as train does)")
    parser.add_argument("--no-keras", action="store_true", help="ours only")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables (for docs/performance.md)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps) <= 0 or (args.cpu_devices is not None and args.cpu_devices <= 0):
        parser.error("--batch-size, --steps and --cpu-devices must be positive")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    else:
        backend.use_every_cpu_core()
    ours = our_breakdown(args.batch_size, args.steps)
    fusions = backend.compiler_options("cpu").get(backend.YNN_FUSION_OPTION, "XLA defaults")
    print(f"{backend.cpu_vendor() or 'unknown CPU'}, batch {args.batch_size}, JAX {jax.__version__}, "
          f"YNNPACK fusions {fusions.replace('LIBRARY_FUSION_TYPE_', '') or 'none'}")
    print("\n".join(table(f"ours, {ours['devices']} device(s), summed over devices", ours, args.markdown,
                          "wall, without the profiler")))
    busy = ", ".join(f"{ms:.1f}" for ms in ours["busy_by_thread"])
    print(f"busy per device thread: {busy} ms of a {ours['wall_ms']:.1f} ms step")
    if not args.no_keras:
        keras = keras_breakdown(args.batch_size, args.steps)
        keras["by_role"]["TensorFlow's own kernels (not oneDNN)"] = max(
            keras["wall_ms"] - sum(keras["by_role"].values()), 0.0)
        print()
        print("\n".join(table("Keras on TensorFlow (oneDNN primitives, each on every core)", keras, args.markdown,
                              "wall, with oneDNN's verbose log on")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
