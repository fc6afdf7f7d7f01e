"""``headrace train lm``: the decoder-only Transformer on text-ingest's packed rows, on a DTensor mesh.

    headrace train lm --data OUT --output M [--attention {multi_head,talking_heads}] [--mesh batch=4,model=2]
        [--layers N] [--d-model D] [--heads H] [--steps N] [--batch-size B]

Reads ``OUT/train-*.tfrecord`` (`headrace.pipelines.text.dataset`; the vocabulary size from
``OUT/tokenizer.model``, the row length from spec.json), trains `headrace.models.transformer.Transformer`
(batch over ``batch``; heads, FFN width and vocabulary over ``model``) through the shared training loop,
and evaluates the perplexity of ``OUT/eval-*.tfrecord``: exp of the mean cross-entropy of every target
that follows a token of its own document. Writes ``M/metrics.json`` (loss, ``perplexity``,
``tokens_per_sec``), ``M/curves.png``, TensorBoard summaries, checkpoints, ``M/tokenizer.model`` and
``M/weights.npz`` (for `headrace generate lm`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import config as config_lib
from headrace.core import mesh as mesh_lib
from headrace.core.errors import InputError
from headrace.models.optim import Adam
from headrace.models.transformer import Transformer, TransformerConfig
from headrace.pipelines import text
from headrace.runners import loop
from headrace.transforms.tfrecord import read_spec

__all__ = ["WEIGHTS", "LMTask", "LMTrainConfig", "train_and_evaluate", "transformer_config"]

WEIGHTS = "weights.npz"


@dataclasses.dataclass(frozen=True)
class LMTrainConfig(loop.TrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "output of `headrace run text-ingest`"})
    attention: str = dataclasses.field(
        default="talking_heads", metadata={"help": "multi_head | talking_heads"}
    )
    layers: int = 2
    d_model: int = 128
    heads: int = 4
    ffn: int = 256
    batch_size: int = 32
    steps: int = 300
    learning_rate: float = 3e-3
    log_every_seconds: float = 10.0
    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)


@config_lib.register("lm", command="train lm")
def lm() -> LMTrainConfig:
    """A 2-layer talking-heads Transformer (d_model 128, 4 heads) on text-ingest rows, 300 steps."""
    return LMTrainConfig()


def model_config(config: LMTrainConfig) -> TransformerConfig:
    """The Transformer's config: the flags, the vocabulary of the data's tokenizer, its row length."""
    import sentencepiece as spm

    tokenizer = Path(config.data) / text.TOKENIZER
    if not tokenizer.is_file():
        raise InputError(
            f"--data {config.data}: no {text.TOKENIZER} (is it the output of `headrace run text-ingest`?)"
        )
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    seq_len = read_spec(config.data, "train").features["tokens"].shape[0]
    return transformer_config(config, vocab, seq_len)


def transformer_config(config: LMTrainConfig, vocab_size: int, seq_len: int) -> TransformerConfig:
    """The Transformer's config from a trainer's flags, for a vocabulary and a row length."""
    if config.d_model % config.heads:
        raise InputError(f"--d-model {config.d_model} is not a multiple of --heads {config.heads}")
    return dataclasses.replace(
        config.model,
        vocab_size=vocab_size,
        max_len=seq_len,
        attention=config.attention,
        layers=config.layers,
        d_model=config.d_model,
        heads=config.heads,
        head_dim=config.d_model // config.heads,
        ffn=config.ffn,
        seed=config.seed,
    )


class LMTask(loop.Task):
    name = "lm"
    data_files = (text.TOKENIZER,)  # copied from the data into the output, for the generator

    def __init__(self, config: LMTrainConfig):
        super().__init__(config)
        self.model_config = model_config(config)
        report = json.loads((Path(config.data) / "report.json").read_text())
        self.fill = report.get("packing_efficiency") or 1.0  # share of a row's slots holding tokens

    def build(self, mesh) -> None:
        self.model = Transformer(self.model_config, mesh)
        self.optimizer = Adam(self.model.weights, learning_rate=self.config.learning_rate)

    def checkpoint_groups(self):
        return {"": {"model": self.model, "optimizer": self.optimizer}}

    def total_steps(self) -> int:
        return self.config.steps

    def dataset(self, epoch: int):
        c = self.config
        return text.dataset(
            c.data, "train", c.batch_size, shuffle=True, seed=c.seed, repeat=True, drop_remainder=True,
            share=cluster.input_share(c),
        )  # fmt: skip

    def _place(self, batch, keys=("tokens", "segment_ids", "positions")):
        if self.mesh is None:  # --mesh '': plain TensorFlow on one device
            return tuple(tf.convert_to_tensor(batch[k]) for k in keys)
        return tuple(mesh_lib.shard_batch(self.mesh, batch[k]) for k in keys)

    def place(self, batch, step: int):
        return self._place(batch)

    def train_step(self, tokens, segment_ids, positions):
        with tf.GradientTape() as tape:
            loss = self.model.loss(tokens, segment_ids, positions)
        self.optimizer.apply(tape.gradient(loss, self.model.weights), self.model.weights)
        return {"loss": loss}

    def predict_step(self, tokens, segment_ids, positions):
        return self.model.row_losses(tokens, segment_ids, positions)

    def evaluate(self, fit: loop.Fit) -> dict:
        total, count = 0.0, 0.0
        for _, (losses, counts) in fit.predict(
            text.dataset(self.config.data, "eval", self.config.batch_size), self._place
        ):
            total += float(np.sum(losses))
            count += float(np.sum(counts))
        if not count:
            return {}
        return {"eval_tokens": int(count), "eval_loss": total / count, "perplexity": math.exp(total / count)}

    def metrics(self, result: loop.FitResult) -> dict:
        c = self.model_config
        # The steady rate: a step's tokens over the median step time, the first step (tracing) left out.
        steady = result.step_seconds[1:] or result.step_seconds
        step_tokens = self.config.batch_size * c.max_len * self.fill
        return {
            "attention": c.attention,
            "tokens_per_sec": result.examples_per_sec * c.max_len * self.fill,
            "step_seconds_median": float(np.median(steady)) if steady else None,
            "steady_tokens_per_sec": step_tokens / float(np.median(steady)) if steady else None,
            "parameters": int(sum(np.prod(w.shape) for w in self.model.weights)),
            "model": dataclasses.asdict(c),
        }

    def title(self, m) -> str:
        return f"lm ({m['attention']}, {self.model_config.layers} layers): eval perplexity {m.get('perplexity', float('nan')):.2f}"

    def write_outputs(self, directory: Path, result: loop.FitResult, m: dict) -> None:
        """The tokenizer, and the weights gathered off the mesh (``weights.npz``, with the model's config
        in metrics.json): what `headrace generate lm` loads, on any device."""
        for name in self.data_files:
            if (Path(self.config.data) / name).is_file():
                shutil.copy(Path(self.config.data) / name, directory / name)
        weights = {w.name.split(":")[0]: mesh_lib.to_numpy(w) for w in self.model.weights}
        np.savez(directory / WEIGHTS, **weights)


def train_and_evaluate(config: LMTrainConfig) -> dict:
    return loop.fit(LMTask(config))
