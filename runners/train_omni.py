"""``headrace train omni``: the talking-heads decoder on omni-ingest's interleaved streams.

    headrace train omni --data OUT --output M [--mesh batch=4,model=2] [--layers N] [--d-model D]
        [--heads H] [--steps N] [--batch-size B] [--attention {talking_heads,multi_head}]

The model is `headrace.models.transformer.Transformer` as `train lm` trains it, over the one vocabulary of
the data (``OUT/vocab.json``: text pieces, the begin/end tokens, audio codes, image codes, each range at
its offset): one embedding table for every modality, split over ``model`` on its width, and the output
projection split over ``model`` on the vocabulary. Every next token of an example is a target, whatever
its modality. Evaluation reports the perplexity of ``OUT/eval-*`` over all targets and per modality of the
target (``perplexity_text``, ``_audio``, ``_image``, ``_video``). Writes what `train lm` writes, plus the
data's ``vocab.json``, ``tokenizer.model`` and ``codebooks.npz``: the output is all `generate omni` needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import config as config_lib
from headrace.core.errors import InputError
from headrace.pipelines import omni
from headrace.runners import loop
from headrace.runners.train_lm import LMTask, LMTrainConfig, transformer_config
from headrace.transforms.omni_tokens import CODEBOOKS, MODALITY_ID, TOKENIZER, VOCAB, Vocabulary
from headrace.transforms.tfrecord import read_spec

__all__ = ["OmniTask", "OmniTrainConfig", "train_and_evaluate"]

_KINDS = 1 + max(MODALITY_ID.values())


@dataclasses.dataclass(frozen=True)
class OmniTrainConfig(LMTrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "output of `headrace run omni-ingest`"})
    batch_size: int = 16
    steps: int = 300


@config_lib.register("omni", command="train omni")
def omni_train() -> OmniTrainConfig:
    """A 2-layer talking-heads decoder (d_model 128, 4 heads) on omni-ingest streams, 300 steps."""
    return OmniTrainConfig()


class OmniTask(LMTask):
    name = "omni"
    data_files = (VOCAB, TOKENIZER, CODEBOOKS)  # all `generate omni` needs beside the weights

    def __init__(self, config: OmniTrainConfig):
        loop.Task.__init__(self, config)
        root = Path(config.data)
        if not (root / VOCAB).is_file():
            raise InputError(
                f"--data {config.data}: no {VOCAB} (is it the output of `headrace run omni-ingest`?)"
            )
        self.vocab = Vocabulary.from_json(json.loads((root / VOCAB).read_text()))
        seq_len = read_spec(config.data, "train").features["tokens"].shape[0]
        read_spec(config.data, "train", omni.omni_spec(seq_len))  # a text-ingest output is refused by name
        # The vocabulary is rounded up to a multiple of 64: the output projection is split over `model` on
        # this axis (the ids past the vocabulary never occur, so they learn to be improbable).
        self.model_config = transformer_config(config, -(-self.vocab.size // 64) * 64, seq_len)
        report = json.loads((root / "report.json").read_text())
        self.fill = report.get("packing_efficiency") or 1.0

    def dataset(self, epoch: int):
        c = self.config
        return omni.dataset(
            c.data,
            "train",
            c.batch_size,
            shuffle=True,
            seed=c.seed,
            repeat=True,
            drop_remainder=True,
            share=cluster.input_share(c),
        )

    def _place_eval(self, batch):
        return self._place(batch, ("tokens", "segment_ids", "positions", "modalities"))

    def predict_step(self, tokens, segment_ids, positions, modalities):
        """(summed cross-entropy [b, kinds], targets [b, kinds]) by the modality id of the target."""
        logits = self.model(tokens, segment_ids, positions)[:, :-1]
        targets = tf.cast(tokens[:, 1:], tf.int32)
        seg = tf.cast(segment_ids, tf.int32)
        weight = tf.cast((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), tf.float32)  # [b, l-1]
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        kind = tf.one_hot(tf.cast(modalities[:, 1:], tf.int32), _KINDS)  # [b, l-1, kinds]
        return tf.einsum("bl,blk->bk", xent * weight, kind), tf.einsum("bl,blk->bk", weight, kind)

    def evaluate(self, fit: loop.Fit) -> dict:
        total = np.zeros(_KINDS)
        count = np.zeros(_KINDS)
        for _, (losses, counts) in fit.predict(
            omni.dataset(self.config.data, "eval", self.config.batch_size), self._place_eval
        ):
            total += np.sum(losses, axis=0)
            count += np.sum(counts, axis=0)
        if not count.sum():
            return {}
        out = {
            "eval_tokens": int(count.sum()),
            "eval_loss": float(total.sum() / count.sum()),
            "perplexity": math.exp(total.sum() / count.sum()),
        }
        for name, k in MODALITY_ID.items():
            if count[k]:
                out[f"perplexity_{name}"] = math.exp(total[k] / count[k])
                out[f"eval_tokens_{name}"] = int(count[k])
        return out

    def metrics(self, result: loop.FitResult) -> dict:
        return {**super().metrics(result), "vocab": self.vocab.to_json()}

    def title(self, m) -> str:
        return f"omni ({m['attention']}): eval perplexity {m.get('perplexity', float('nan')):.2f}"


def train_and_evaluate(config: OmniTrainConfig) -> dict:
    return loop.fit(OmniTask(config))
