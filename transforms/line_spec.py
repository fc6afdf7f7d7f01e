"""Delimited text records declared once: the writer's format, and the reader's checks and parser.

Streams carry records as Kafka messages of delimited text (the online CTR examples:
``label <TAB> weight <TAB> 39 raw fields``). A `LineSpec` is the line-format counterpart of
`headrace.transforms.tfrecord.FeatureSpec`: the producer formats lines with `LineSpec.format`, the
consumer names what is wrong with a line (`problem`: the first bad field) and parses whole batches of
good lines into column tensors (`parse`, vectorised TensorFlow ops), so the two ends cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["Column", "LineSpec"]


@dataclasses.dataclass(frozen=True)
class Column:
    """One field of a line: text, an integer or a float; `choices` restricts the text, `positive` the
    number."""

    name: str
    kind: Literal["str", "int", "float"] = "str"
    choices: tuple[str, ...] = ()
    positive: bool = False
    description: str = ""

    def problem(self, text: str) -> str | None:
        if self.choices and text not in self.choices:
            return f"{self.name}: expected one of {'/'.join(self.choices)}, got {text!r}"
        if self.kind == "str":
            return None
        try:
            value = int(text) if self.kind == "int" else float(text)
        except ValueError:
            return f"{self.name}: not {'an integer' if self.kind == 'int' else 'a number'}: {text!r}"
        if self.kind == "float" and not math.isfinite(value):
            return f"{self.name}: not finite: {text!r}"
        if self.positive and not value > 0:
            return f"{self.name}: must be > 0, got {text!r}"
        return None


class LineSpec:
    """The columns of one kind of delimited line (see the module docstring)."""

    def __init__(self, name: str, columns: Sequence[Column], delimiter: str = "\t"):
        self.name, self.columns, self.delimiter = name, tuple(columns), delimiter
        self.names = [c.name for c in self.columns]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{name}: column names repeat")

    def __repr__(self) -> str:
        return f"LineSpec({self.name!r}, {len(self.columns)} columns)"

    def __reduce__(self):
        return (LineSpec, (self.name, self.columns, self.delimiter))

    def format(self, values: Sequence[Any]) -> str:
        """A line of `values` in column order (floats as %.6g)."""
        if len(values) != len(self.columns):
            raise ValueError(f"{self.name}: {len(values)} values for {len(self.columns)} columns")
        parts = []
        for column, value in zip(self.columns, values):
            if column.kind == "float":
                parts.append(f"{value:.6g}")
            else:
                parts.append(str(value))
        return self.delimiter.join(parts)

    def problem(self, line: bytes | str) -> str | None:
        """What is wrong with a line (the field count, or the first bad field), or None."""
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError:
            return "not UTF-8"
        parts = text.rstrip("\r\n").split(self.delimiter)
        if len(parts) != len(self.columns):
            return f"expected {len(self.columns)} fields, got {len(parts)}"
        for column, part in zip(self.columns, parts):
            why = column.problem(part)
            if why is not None:
                return why
        return None

    def parse(self, lines):
        """Good lines (bytes, or a [B] string tensor, also inside a tf.function) -> ``{column: [B]
        tensor}`` (string, int64 or float32)."""
        import tensorflow as tf

        n = len(self.columns)
        if not isinstance(lines, tf.Tensor):
            lines = tf.constant(list(lines), tf.string)
        parts = tf.strings.split(lines, self.delimiter).to_tensor(default_value="", shape=[None, n])
        out = {}
        for k, column in enumerate(self.columns):
            if column.kind == "str":
                out[column.name] = parts[:, k]
            else:
                out[column.name] = tf.strings.to_number(
                    parts[:, k], tf.int64 if column.kind == "int" else tf.float32
                )
        return out

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "delimiter": self.delimiter,
            "columns": [dataclasses.asdict(c) for c in self.columns],
        }
