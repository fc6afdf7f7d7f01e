"""``headrace export ctr|unet3d``: a trained model as TFLite, float32 and (``--int8``) int8.

    headrace export ctr --model M [--int8] [--output M/tflite] [--samples 1024]
    headrace export unet3d --model M [--int8] [--output M/tflite] [--samples 16]

M is a ``train ctr`` / ``train unet3d`` output (a retrain date's ``model/`` too). Written to --output
(default M/tflite), whole or not at all: ``float32.tflite``, with --int8 ``int8.tflite``, and
``export.json`` (each file's size and ops: which run int8 and which stay float). The representative
dataset of the int8 calibration is drawn from the model's own training data (the ``data`` of its
resolved_config.json): --samples rows of the train split for CTR, --samples training patches for the
U-Net.

CTR: the graph is rows -> probability (`ServingCTR.from_rows`); the id table stays outside as
``keys.npy`` (`headrace.models.quantize.RowLookup`) and `CTRLite` puts the three together (hashing of the
39 raw fields, row lookup, the TFLite graph). U-Net: the exported patch forward, ``volume`` [B, d, h, w,
1] -> foreground probability; `predict unet3d`'s sliding window runs it like the SavedModel.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headrace.core.errors import ConfigError, InputError

__all__ = ["CTRLite", "export_ctr", "export_unet3d", "main"]

_log = logging.getLogger("headrace.export")


def _resolved(model: Path) -> dict:
    path = model / "resolved_config.json"
    if not path.is_file():
        raise InputError(f"--model {model}: no resolved_config.json (is it a trainer's output?)")
    return json.loads(path.read_text())


def _serving_ctr(model: Path, resolved: dict):
    """The ServingCTR of a `train ctr` output, rebuilt from its SavedModel's variables."""
    import tensorflow as tf

    from headrace.models.ctr import CTRModelConfig
    from headrace.models.ctr_serving import ServingCTR
    from headrace.models.embedding import FIELDS

    variables = model / "saved_model" / "variables" / "variables"
    if not (model / "saved_model" / "saved_model.pb").is_file():
        raise InputError(f"--model {model}: no saved_model/ (is it a `train ctr` output?)")
    shapes = dict(tf.train.list_variables(str(variables)))
    key = next((k for k in shapes if k.startswith("keys/")), None)
    if key is None:
        raise InputError(
            f"--model {model}: its SavedModel has no id keys (exported by an older headrace; retrain)"
        )
    n = shapes[key][0]
    config = CTRModelConfig(
        name=resolved["model"],
        num_fields=len(FIELDS),
        embedding_dim=resolved["embedding_dim"],
        hidden=tuple(resolved["hidden"]),
        cross_layers=resolved["cross_layers"],
        seed=resolved["seed"],
    )
    dim = config.embedding_dim
    # Zeros of the saved shapes (the dense weights as initialised), then every variable read from the save.
    module = ServingCTR(
        config, np.arange(n, dtype=np.int64), np.zeros((n, dim)), np.zeros((n, 1)), [], np.ones(len(FIELDS))
    )
    tf.train.Checkpoint(root=module).read(str(variables)).expect_partial()
    return module


class CTRLite:
    """A CTR model's TFLite export: ``probability(columns)`` for the 39 raw fields as [B] string arrays."""

    def __init__(self, directory: str | Path, kind: str = "int8", num_threads: int | None = None):
        import tensorflow as tf

        from headrace.models.embedding import FIELDS, serving_ids
        from headrace.models.quantize import RowLookup, TFLiteModel

        directory = Path(directory)
        self.model = TFLiteModel((directory / f"{kind}.tflite").read_bytes(), num_threads)
        self.lookup = RowLookup(np.load(directory / "keys.npy"))
        specs = {name: tf.TensorSpec([None], tf.string) for name in FIELDS}
        self._ids = tf.function(lambda **fields: serving_ids(fields)).get_concrete_function(**specs)

    def rows(self, columns: dict) -> np.ndarray:
        import tensorflow as tf

        ids = self._ids(**{k: tf.constant(v) for k, v in columns.items()}).numpy()
        return self.lookup(ids)

    def probability(self, columns: dict) -> np.ndarray:
        return self.model(self.rows(columns))[0]


def _commit(files: dict[str, bytes], summary: dict, output: Path) -> Path:
    from headrace.core.outputs import staged_output

    with staged_output(str(output), overwrite=True) as out:
        for name, content in files.items():
            (out / name).write_bytes(content)
        (out / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return output


def export_ctr(model: str, output: str = "", *, int8: bool = False, samples: int = 1024) -> dict:
    import tensorflow as tf

    from headrace.models.quantize import RowLookup, convert, op_summary
    from headrace.runners.retrain import _split_columns

    model_dir = Path(model)
    resolved = _resolved(model_dir)
    module = _serving_ctr(model_dir, resolved)
    keys = module.keys.numpy()

    @tf.function(input_signature=[tf.TensorSpec([None, 39], tf.int32, name="rows")])
    def forward(rows):
        return {"probability": module.from_rows(tf.cast(rows, tf.int64))}

    function = forward.get_concrete_function()
    files = {"float32.tflite": convert(function, module, int8=False), "keys.npy": _npy(keys)}
    if int8:
        columns, _ = _split_columns(resolved["data"], "train")
        from headrace.models.embedding import FIELDS, serving_ids

        take = {k: v[:samples] for k, v in columns.items()}
        ids = serving_ids({k: tf.constant(take[k]) for k in FIELDS}).numpy()
        rows = RowLookup(keys)(ids)

        def representative():
            for start in range(0, len(rows), 32):
                yield [rows[start : start + 32]]

        files["int8.tflite"] = convert(function, module, representative)
    summary = {
        "model": str(model_dir.resolve()),
        "kind": "ctr",
        "keys": len(keys),
        "files": {name: op_summary(c) for name, c in files.items() if name.endswith(".tflite")},
        "calibration_rows": min(samples, len(rows)) if int8 else 0,
    }
    _commit(files, summary, Path(output or model_dir / "tflite"))
    return summary


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _patches(data: str, patch: tuple[int, int, int], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` random training patches [1, d, h, w, 1] (float32) from a ct-ingest output's volumes."""
    from headrace.pipelines.ct import volume_dataset

    rng = np.random.default_rng(seed)
    volumes = [v["volume"].numpy() for v in volume_dataset(data)]
    if not volumes:
        raise InputError(f"{data}: no volumes to calibrate on")
    out = []
    for k in range(count):
        v = volumes[k % len(volumes)]
        v = np.pad(v, [(0, max(0, p - s)) for p, s in zip(patch, v.shape)])
        corner = [rng.integers(0, s - p + 1) for s, p in zip(v.shape, patch)]
        window = v[tuple(slice(c, c + p) for c, p in zip(corner, patch))]
        out.append(window[None, ..., None].astype(np.float32))
    return out


def export_unet3d(model: str, output: str = "", *, int8: bool = False, samples: int = 16) -> dict:
    import tensorflow as tf

    from headrace.models.quantize import convert, op_summary

    model_dir = Path(model)
    resolved = _resolved(model_dir)
    if not (model_dir / "saved_model" / "saved_model.pb").is_file():
        raise InputError(f"--model {model}: no saved_model/ (is it a `train unet3d` output?)")
    patch = tuple(json.loads((model_dir / "metrics.json").read_text())["patch"])
    loaded = tf.saved_model.load(str(model_dir / "saved_model"))
    function = loaded.signatures["serving_default"]
    files = {"float32.tflite": convert(function, loaded, int8=False)}
    if int8:
        windows = _patches(resolved["data"], patch, samples)
        files["int8.tflite"] = convert(function, loaded, lambda: ([w] for w in windows))
    summary = {
        "model": str(model_dir.resolve()),
        "kind": "unet3d",
        "patch": list(patch),
        "files": {name: op_summary(c) for name, c in files.items()},
        "calibration_patches": samples if int8 else 0,
    }
    _commit(files, summary, Path(output or model_dir / "tflite"))
    return summary


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] not in ("ctr", "unet3d"):
        raise ConfigError("headrace export: expected `export ctr` or `export unet3d`")
    kind, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"headrace export {kind}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"a `train {kind}` output")
    parser.add_argument("--output", default="", help="default: MODEL/tflite")
    parser.add_argument(
        "--int8", action="store_true", help="also the int8 model (post-training quantisation)"
    )
    parser.add_argument(
        "--samples", type=int, default=1024 if kind == "ctr" else 16, help="calibration inputs"
    )
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    fn = export_ctr if kind == "ctr" else export_unet3d
    summary = fn(args.model, args.output, int8=args.int8, samples=args.samples)
    print(json.dumps(summary, indent=2))
    return 0
