"""``headrace generate lm``: text from a trained `train lm` model, a token at a time with a key-value cache.

    headrace generate lm --model M --prompt TEXT [--max-tokens 64] [--temperature 0.8] [--seed 0]

The prompt is encoded with the model's tokenizer and run through `Transformer.prefill` in one pass
(filling the cache), then tokens are drawn (argmax at temperature 0) and printed as they come.
Prints time to first token and tokens/s; returns them with the text.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.models.transformer import Transformer, TransformerConfig
from headrace.pipelines import text
from headrace.runners.train_lm import WEIGHTS

__all__ = ["GenerateConfig", "draw", "generate", "load_model", "load_transformer", "prefill_prompt"]


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    model: str = dataclasses.field(default="", metadata={"help": "a `train lm` output folder"})
    prompt: str = ""
    max_tokens: int = 64
    temperature: float = 0.8
    seed: int = 0


@config_lib.register("lm-generate", command="generate lm")
def lm_generate() -> GenerateConfig:
    """64 tokens at temperature 0.8 from a trained lm."""
    return GenerateConfig()


def load_transformer(directory: str, *, kind: str = "train lm") -> Transformer:
    """The Transformer a trainer wrote (``weights.npz`` and its config in metrics.json), unsharded."""
    root = Path(directory)
    if not (root / WEIGHTS).is_file() or not (root / "metrics.json").is_file():
        raise InputError(f"--model {directory}: no {WEIGHTS} / metrics.json (is it a `{kind}` output?)")
    config = TransformerConfig(**json.loads((root / "metrics.json").read_text())["model"])
    model = Transformer(config)
    weights = np.load(root / WEIGHTS)
    for w in model.weights:
        w.assign(weights[w.name.split(":")[0]])
    return model


def load_model(directory: str) -> tuple[Transformer, object]:
    """The trained Transformer (unsharded, plain variables) and its SentencePiece tokenizer."""
    import sentencepiece as spm

    model = load_transformer(directory)
    return model, spm.SentencePieceProcessor(model_file=str(Path(directory) / text.TOKENIZER))


def prefill_prompt(prefill, prompt: list[int], length: int):
    """(logits [1, vocab] of the token after `prompt`, the cache) from one pass of a traced
    `Transformer.prefill` over the prompt padded to `length`: one trace for any prompt (the mask is
    causal, so the padding changes nothing before it)."""
    padded = np.zeros([1, length], np.int32)
    padded[0, : len(prompt)] = prompt
    logits, cache = prefill(tf.constant(padded))
    return logits[:, len(prompt) - 1], cache


def draw(logits, temperature: float, rng) -> int:
    """A token from logits [vocab] (-inf where not allowed): the argmax at temperature 0, else sampled
    from the softmax at `temperature`."""
    if temperature == 0:
        return int(np.argmax(logits))
    p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(config: GenerateConfig) -> dict:
    if config.max_tokens < 1 or config.temperature < 0:
        raise ConfigError("--max-tokens >= 1 and --temperature >= 0")
    model, sp = load_model(config.model)
    prompt = sp.encode(config.prompt) or [sp.eos_id()]
    length = model.config.max_len
    if len(prompt) + config.max_tokens > length:
        raise ConfigError(
            f"prompt ({len(prompt)} tokens) + --max-tokens {config.max_tokens} exceed the model's "
            f"{length} positions"
        )
    step = tf.function(model.decode, reduce_retracing=True)
    prefill = tf.function(model.prefill)
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    logits, cache = prefill_prompt(prefill, prompt, length)
    out, first = [], None
    position = len(prompt)
    for _ in range(config.max_tokens):
        token = draw(logits.numpy()[0].astype(np.float64), config.temperature, rng)
        if first is None:
            first = time.perf_counter() - start
        if token == sp.eos_id():
            break
        out.append(token)
        print(sp.id_to_piece(token).replace("\u2581", " "), end="", flush=True, file=sys.stdout)
        logits, cache = step(tf.constant([token]), tf.constant(position), cache)
        position += 1
    seconds = time.perf_counter() - start
    print(file=sys.stdout)
    return {
        "text": sp.decode(out),
        "ids": out,
        "tokens": len(out),
        "time_to_first_token_s": round(first or seconds, 4),
        "tokens_per_sec": round(len(out) / (seconds - (first or 0)), 1)
        if len(out) > 1 and seconds > (first or 0)
        else None,
    }
