"""Post-training int8 quantisation with TFLite, and a small runtime for the converted models.

`convert` turns a concrete function into a TFLite flatbuffer: float32 as it is, or int8 (Lingvo's and
TFLite's post-training recipe: weights int8 per channel, activations int8 with ranges calibrated on a
representative dataset drawn from the training data; an op without an int8 kernel stays float, with
quantize / dequantize around it, and `op_summary` says which). `TFLiteModel` runs one, resizing its
inputs to each batch's shape.

The CTR serving graph (`ServingCTR.from_rows`: rows of the embedding table -> probability) converts
whole; the id table stays outside (sorted numpy keys, `RowLookup`), since TFLite has no hash table
that an int8 graph could hold. The 3D U-Net's patch forward converts as exported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf

__all__ = ["RowLookup", "TFLiteModel", "convert", "op_summary"]


def convert(
    function,
    trackable,
    representative: Callable[[], Iterable[Sequence[np.ndarray]]] | None = None,
    *,
    int8: bool = True,
) -> bytes:
    """A TFLite flatbuffer of `function` (a concrete function of `trackable`); int8 needs `representative`
    (a callable yielding input lists, a few hundred examples in all)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], trackable)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    if int8:
        if representative is None:
            raise ValueError("int8 quantisation needs a representative dataset")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, *ops]
    converter.target_spec.supported_ops = ops
    return converter.convert()


def op_summary(content: bytes) -> dict:
    """Ops of a flatbuffer: how many, which run on int8 tensors, which stay float."""
    interpreter = tf.lite.Interpreter(model_content=content)
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    int8_ops, float_ops = Counter(), Counter()
    for op in interpreter._get_ops_details():  # no public listing of ops in tf.lite
        name = op["op_name"]
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        dtypes = {tensors.get(i) for i in op["inputs"] if i >= 0}
        (int8_ops if dtypes & {np.int8, np.uint8} and np.float32 not in dtypes else float_ops)[name] += 1
    return {
        "bytes": len(content),
        "int8_ops": dict(sorted(int8_ops.items())),
        "float_ops": dict(sorted(float_ops.items())),
    }


class TFLiteModel:
    """A converted model: ``model(*inputs)`` -> its outputs (numpy), in the signature's order."""

    def __init__(self, content: bytes, num_threads: int | None = None):
        self._interpreter = tf.lite.Interpreter(model_content=content, num_threads=num_threads)
        self._inputs = sorted(self._interpreter.get_input_details(), key=lambda d: d["index"])
        self._shapes: list[tuple] = []

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        interp = self._interpreter
        shapes = [tuple(x.shape) for x in inputs]
        if shapes != self._shapes:
            for detail, shape in zip(self._inputs, shapes):
                interp.resize_tensor_input(detail["index"], shape)
            interp.allocate_tensors()
            self._shapes = shapes
            self._outputs = sorted(interp.get_output_details(), key=lambda d: d["index"])
        for detail, x in zip(self._inputs, inputs):
            interp.set_tensor(detail["index"], x.astype(detail["dtype"], copy=False))
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in self._outputs]


class RowLookup:
    """The CTR id table outside the graph: ids [B, F] -> rows [B, F] int32 (0 for an id without a row).
    `keys` are the ids that have rows, row ``k + 1`` for ``keys[k]`` (`ServingCTR`'s compaction)."""

    def __init__(self, keys: np.ndarray):
        keys = np.asarray(keys, np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._rows = (order + 1).astype(np.int32)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if not len(self._keys):
            return np.zeros(ids.shape, np.int32)
        at = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
        return np.where(self._keys[at] == ids, self._rows[at], 0).astype(np.int32)
