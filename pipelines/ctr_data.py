"""Generated CTR logs in the Criteo layout with a planted model, for tests, benchmarks and the demo.

Each line: label, 13 integer fields I1..I13, 26 categorical fields C1..C26 (8-digit hex ids), tab-separated,
no header; any field but the label may be empty (missing). Categorical ids are drawn from a Zipf law
(power-law frequencies, as in real click logs); integers from a heavy-tailed (log-normal) law.

The planted model: a few fields are informative, the rest pure noise.

    logit = bias + sum_{i in INFORMATIVE_INT} w_i * log1p(I_i)  +  sum_{c in INFORMATIVE_CAT} effect_c(C_c)
    p(click) = sigmoid(logit)

`planted_probability` recomputes p(click) from a line's raw values (effects are a deterministic function
of field and value), so the Bayes-optimal AUC of any split can be computed without a sidecar file.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from headrace.models.criteo import CAT_FIELDS, INT_FIELDS

__all__ = [
    "CAT_FIELDS",
    "INFORMATIVE_CAT",
    "INFORMATIVE_INT",
    "INT_FIELDS",
    "CtrData",
    "generate",
    "planted_probability",
    "raw_columns",
]

INFORMATIVE_INT = {"I1": 0.35, "I3": -0.25, "I5": 0.2}  # weight of log1p(value)
INFORMATIVE_CAT = {"C1": 1.0, "C2": 0.8, "C3": 0.8, "C6": 0.6, "C9": 0.6, "C14": 0.5}  # effect scale
BIAS = -2.2
# Vocabulary size per categorical field (power-law frequencies within each).
VOCAB = {c: int(v) for c, v in zip(CAT_FIELDS, np.geomspace(20, 50_000, len(CAT_FIELDS)).round())}
MISSING_INT = 0.15
MISSING_CAT = 0.08


@dataclasses.dataclass(frozen=True)
class CtrData:
    path: str
    num_lines: int
    malformed: int


def _field_seed(field: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(field)) * 7919


@functools.cache
def _hex_ids(field: str) -> np.ndarray:
    """The field's vocabulary, most frequent first: distinct 8-digit hex strings (stable per field)."""
    rng = np.random.default_rng(_field_seed(field))
    ids = rng.choice(1 << 32, size=VOCAB[field], replace=False)
    return np.array([f"{v:08x}" for v in ids], dtype=object)


@functools.cache
def _effects(field: str) -> dict[str, float]:
    """effect_c(value) ~ N(0, scale^2), drawn once per vocabulary entry; unknown values have none."""
    rng = np.random.default_rng(_field_seed(field) + 1)
    values = _hex_ids(field)
    return dict(zip(values, rng.normal(size=len(values)) * INFORMATIVE_CAT[field]))


def _effect(field: str, values: np.ndarray) -> np.ndarray:
    table = _effects(field)
    return np.fromiter((table.get(v, 0.0) for v in values), dtype=np.float64, count=len(values))


def planted_probability(columns: dict[str, np.ndarray]) -> np.ndarray:
    """p(click) for rows given as {field: array of raw strings ('' = missing)} (I and C fields)."""
    n = len(next(iter(columns.values())))
    logit = np.full(n, BIAS)
    for field, w in INFORMATIVE_INT.items():
        raw = np.asarray(columns[field], dtype=object)
        present = raw != ""
        vals = np.zeros(n)
        vals[present] = np.log1p(np.maximum(raw[present].astype(np.int64), 0))
        logit += w * vals
    for field in INFORMATIVE_CAT:
        logit += _effect(field, np.asarray(columns[field], dtype=object))
    return 1.0 / (1.0 + np.exp(-logit))


def raw_columns(batch: dict) -> dict[str, np.ndarray]:
    """A parsed CTR-shard batch (``I``, ``I_missing``, ``C`` as numpy) -> {field: raw strings}."""
    ints, missing, cats = np.asarray(batch["I"]), np.asarray(batch["I_missing"]), np.asarray(batch["C"])
    out = {}
    for k, name in enumerate(INT_FIELDS):
        out[name] = np.array(["" if m else str(v) for v, m in zip(ints[:, k], missing[:, k])], dtype=object)
    for k, name in enumerate(CAT_FIELDS):
        out[name] = np.array(
            [c.decode() if isinstance(c, bytes) else str(c) for c in cats[:, k]], dtype=object
        )
    return out


def generate(
    path: str | Path,
    num_lines: int,
    *,
    seed: int = 0,
    malformed_every: int = 0,
    compress: bool = False,
) -> CtrData:
    """Writes a Criteo-format TSV (gzip if `compress`) of `num_lines` valid lines with a planted model,
    plus one malformed line every `malformed_every` lines if given."""
    rng = np.random.default_rng(seed)
    n = num_lines
    cols: dict[str, np.ndarray] = {}
    for field in INT_FIELDS:
        values = np.floor(rng.lognormal(mean=1.0, sigma=1.4, size=n)).astype(np.int64)
        if field == "I2":  # Criteo's I2 has small negative values
            values -= 2
        text = np.array([str(v) for v in values], dtype=object) if n < 10_000 else _int_strings(values)
        text[rng.random(n) < MISSING_INT] = ""
        cols[field] = text
    for field in CAT_FIELDS:
        vocab = _hex_ids(field)
        ranks = np.minimum(rng.zipf(1.2, size=n) - 1, len(vocab) - 1)
        text = vocab[ranks]
        text[rng.random(n) < MISSING_CAT] = ""
        cols[field] = text
    p = planted_probability(cols)
    label = (rng.random(n) < p).astype(np.int64)
    table = pa.table(
        {"label": pa.array(label.astype(str)), **{k: pa.array(v, pa.string()) for k, v in cols.items()}}
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))
    lines = sink.getvalue().to_pybytes().split(b"\n")[:-1]
    malformed = 0
    if malformed_every:
        bad = [b"1\t2\t3", b"x\t" + b"\t".join([b"1"] * 39), b"0\tabc" + b"\t" * 38, b"0" + b"\t" * 40]
        out_lines = []
        for i, line in enumerate(lines):
            out_lines.append(line)
            if i % malformed_every == malformed_every - 1:
                out_lines.append(bad[malformed % len(bad)])
                malformed += 1
        lines = out_lines
    data = b"\n".join(lines) + b"\n"
    if compress:
        with gzip.open(out, "wb") as f:
            f.write(data)
    else:
        out.write_bytes(data)
    return CtrData(str(out), n, malformed)


def _int_strings(values: np.ndarray) -> np.ndarray:
    return np.asarray(pc.cast(pa.array(values), pa.string()).to_numpy(zero_copy_only=False), dtype=object)
