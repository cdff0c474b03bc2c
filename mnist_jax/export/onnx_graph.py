"""The CNN as an ONNX graph, written layer by layer from its variables with the `onnx` package's helpers.

Why not a general converter: tf2onnx cannot read what jax2tf emits (one XlaCallModule op), and the jax2onnx
releases that target ONNX Runtime Web declare an upper bound on orbax-checkpoint below the version this project
needs. Our CNN is a short, closed list of layers (normalise, 3x3 conv, batch norm, relu, 2x2 pool, dense), each of
which is one standard ONNX operator, and `exporting` checks the file against JAX on the whole test split, so a
mistake here cannot ship. A model with a layer this module does not know is refused with the reason.

The graph takes `images` uint8 (N, H, W, C) with N free, and returns `probabilities` float32 (N, classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_jax.config import UserError
from mnist_jax.model import CNN, HEAD

OPSET = 17  # ONNX Runtime Web and every current ONNX Runtime run it
BATCH_NORM_EPSILON = 1e-5  # model.BatchNorm's


class UnsupportedModel(UserError):
    """The model uses something this exporter cannot express in ONNX."""


def check_supported(module: CNN) -> None:
    if module.deskew:
        raise UnsupportedModel("--deskew models are not supported (the deskewing warp has no ONNX form here)")
    if module.dtype != "float32":
        raise UnsupportedModel(f"--dtype {module.dtype} models are not supported (ONNX export computes in float32)")


def to_onnx(module: CNN, variables: dict[str, Any], image_shape: tuple[int, ...]) -> bytes:
    """The serialised ONNX model of `module` with `variables` (as `RestoredModel` holds them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_supported(module)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    nodes, initializers = [], []

    def constant(name: str, value: np.ndarray | float) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def batch_norm(x: str, layer: str, channel_shape: tuple[int, ...]) -> str:
        # The inference form of model.BatchNorm, folded into one multiply-add as the model computes it.
        bn = f"{layer}_bn"
        multiplier = params[bn]["scale"] / np.sqrt(np.asarray(stats[bn]["var"], np.float32) + BATCH_NORM_EPSILON)
        offset = params[bn]["bias"] - stats[bn]["mean"] * multiplier
        x = node("Mul", [x, constant(f"{bn}.multiplier", np.reshape(multiplier, channel_shape))], f"{bn}.scaled")
        return node("Add", [x, constant(f"{bn}.offset", np.reshape(offset, channel_shape))], f"{bn}.out")

    x = node("Cast", ["images"], "pixels", to=TensorProto.FLOAT)
    # The model's normalise, in its order of operations: (pixels / 255 - mean) / std.
    x = node("Mul", [x, constant("one_over_255", np.float32(1.0 / 255.0))], "scaled_pixels")
    x = node("Sub", [x, constant("mean", module.mean)], "centred_pixels")
    x = node("Mul", [x, constant("one_over_std", np.float32(1.0 / module.std))], "normalised")
    x = node("Transpose", [x], "nchw", perm=[0, 3, 1, 2])  # ONNX convolutions are channels-first
    for block in range(1, len(module.conv_features) + 1):
        for position in range(1, module.convs_per_block + 1):
            layer = f"conv{block}_{position}"
            kernel = np.transpose(params[layer]["kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
            x = node("Conv", [x, constant(f"{layer}.kernel", kernel), constant(f"{layer}.bias", params[layer]["bias"])],
                     f"{layer}.out", kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # linen's "SAME" for 3x3, stride 1
            if module.batch_norm:
                x = batch_norm(x, layer, (-1, 1, 1))
            x = node("Relu", [x], f"{layer}.relu")
        pool = "MaxPool" if module.pooling == "max" else "AveragePool"
        x = node(pool, [x], f"pool{block}", kernel_shape=[2, 2], strides=[2, 2])
    # The model flattens channels-last, so the dense weights expect (H, W, C) order.
    x = node("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])
    x = node("Flatten", [x], "features", axis=1)
    for number in range(1, len(module.dense_features) + 1):
        layer = f"dense{number}"
        x = node("Gemm", [x, constant(f"{layer}.kernel", params[layer]["kernel"]),
                          constant(f"{layer}.bias", params[layer]["bias"])], f"{layer}.out")
        if module.batch_norm:
            x = batch_norm(x, layer, (-1,))
        x = node("Relu", [x], f"{layer}.relu")  # dropout is the identity at inference
    x = node("Gemm", [x, constant(f"{HEAD}.kernel", params[HEAD]["kernel"]),
                      constant(f"{HEAD}.bias", params[HEAD]["bias"])], "logits")
    node("Softmax", [x], "probabilities", axis=-1)

    graph = helper.make_graph(
        nodes, "mnist_jax_cnn",
        inputs=[helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", *image_shape])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", module.num_classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mnist_jax")
    model.ir_version = 8  # the lowest that opset 17 allows, so older ONNX Runtime builds read the file too
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()
