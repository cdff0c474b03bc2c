"""Export (`python -m mnist_jax.export`, the `[export]` extra): a checkpoint -> TFLite, ONNX, a SavedModel and an
offline web app, each verified by its own runtime.

`pipeline` runs it; `tf_formats` (jax2tf -> SavedModel, TFLite), `onnx_graph` and `webapp` write the formats;
`runtimes` loads the files in their runtimes (also for `predict --model`). Importing this package imports none of
the export libraries: each module imports them where it uses them.
"""
