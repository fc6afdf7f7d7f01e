"""``headrace generate omni``: a trained omni model answers a spoken, written or pictured prompt in text,
audio or an image, streaming its tokens.

    headrace generate omni --model M (--prompt-audio WAV | --prompt-text T | --prompt-image IMG)
        [--respond-with {text,audio,image}] [--max-tokens N] [--temperature 0.8] [--output DIR]

The prompt goes through the tokenisers ingest learned (the model's copy of ``vocab.json``,
``tokenizer.model`` and ``codebooks.npz``): speech to log-mel frames to audio codes, text to pieces, a
picture to patch codes, each between its begin and end tokens; the begin token of the answer's modality
follows. The prompt is run in one pass (`Transformer.prefill`, padded to the model's length so one trace
serves every prompt), then tokens are drawn one at a time with the key-value cache, restricted to the
answer's modality (its content ids and its end token; an image is exactly its patch count). Tokens are
printed as they come (text pieces; a dot per audio or image code).

Timing starts when the prompt's bytes are in hand (the model loaded and its two functions traced, as in
a server) and covers the front end, the codebook look-up, the prefill and the draws:
``time_to_first_token_s``; for an audio answer ``time_to_first_audio_s``, when the first
`first_audio_frames` codes (80 ms) have been drawn and turned into samples by Griffin-Lim. With
``--output`` the answer is written as ``answer.txt``, ``answer.wav`` or ``answer.png``, and the prompt's
own reconstruction beside it (``prompt.wav`` / ``prompt.png``: what the model heard or saw).
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
from headrace.runners.generate_lm import draw, load_transformer, prefill_prompt
from headrace.transforms.media import MediaError, write_wav
from headrace.transforms.omni_tokens import VOCAB, OmniTokenizer

__all__ = ["OmniGenerateConfig", "Responder", "generate"]

RESPONSES = ("text", "audio", "image")


@dataclasses.dataclass(frozen=True)
class OmniGenerateConfig:
    model: str = dataclasses.field(default="", metadata={"help": "a `train omni` output folder"})
    prompt_text: str = ""
    prompt_audio: str = dataclasses.field(default="", metadata={"help": "a WAV file"})
    prompt_image: str = dataclasses.field(default="", metadata={"help": "an image file"})
    respond_with: str = dataclasses.field(default="text", metadata={"help": "text | audio | image"})
    max_tokens: int = dataclasses.field(
        default=0, metadata={"help": "0: 48 for text, 150 (3 s) for audio, an image's patch count"}
    )
    min_tokens: int = dataclasses.field(
        default=-1,
        metadata={"help": "tokens before the answer may end (-1: --first-audio-frames for audio, else 1)"},
    )
    temperature: float = 0.8
    seed: int = 0
    first_audio_frames: int = dataclasses.field(
        default=4, metadata={"help": "audio codes turned into samples for the first audio (4: 80 ms)"}
    )
    output: str = dataclasses.field(default="", metadata={"help": "folder for answer.* and prompt.*"})


@config_lib.register("omni-generate", command="generate omni")
def omni_generate() -> OmniGenerateConfig:
    """Answer a prompt in text at temperature 0.8."""
    return OmniGenerateConfig()


class Responder:
    """A loaded, traced omni model: `answer` runs one prompt (see the module docstring)."""

    def __init__(self, directory: str):
        if not (Path(directory) / VOCAB).is_file():
            raise InputError(f"--model {directory}: no {VOCAB} (is it a `train omni` output?)")
        self.model = load_transformer(directory, kind="train omni")
        self.tokens = OmniTokenizer(directory)
        self.vocab = self.tokens.vocab
        self.length = self.model.config.max_len
        self._prefill = tf.function(self.model.prefill)
        self._decode = tf.function(self.model.decode, reduce_retracing=True)
        _logits, cache = self._prefill(tf.zeros([1, self.length], tf.int32))  # trace both once
        self._decode(tf.constant([0]), tf.constant(1), cache)
        # The audio front end's modules (scipy's WAV reader and resampler) are loaded here, not on the
        # first prompt's clock: 0.5 s of imports, measured.
        import io

        silence = io.BytesIO()
        write_wav(silence, np.zeros(2205, np.float32), 22050)
        self.tokens.audio(silence.getvalue())

    def prompt(self, *, text: str = "", audio: bytes = b"", image: bytes = b"") -> list[int]:
        ids = []
        if audio:
            ids += self.tokens.audio(audio)
        if image:
            ids += self.tokens.image(image)
        if text:
            ids += self.tokens.text(text)
        return ids

    def allowed(self, kind: str) -> np.ndarray:
        """A mask over the model's ids: the content ids of `kind` and its end token."""
        mask = np.zeros(self.model.config.vocab_size, bool)
        start, stop = self.vocab.range(kind)
        mask[max(start, 3 if kind == "text" else start) : stop] = True  # no padding/unknown/end pieces
        if kind != "image":
            mask[self.vocab.end(kind)] = True
        return mask

    def answer(self, config: OmniGenerateConfig, *, echo=None) -> dict:
        kind = config.respond_with
        start = time.perf_counter()
        try:
            prompt = self.prompt(
                text=config.prompt_text,
                audio=Path(config.prompt_audio).read_bytes() if config.prompt_audio else b"",
                image=Path(config.prompt_image).read_bytes() if config.prompt_image else b"",
            )
        except MediaError as exc:
            raise InputError(f"prompt: {exc}") from None
        prompt.append(self.vocab.begin(kind))
        limit = (
            config.max_tokens or {"text": 48, "audio": 150, "image": self.vocab.media.patches_per_image}[kind]
        )
        if kind == "image":
            limit = min(limit, self.vocab.media.patches_per_image)
        if len(prompt) + limit > self.length:
            raise ConfigError(
                f"the prompt ({len(prompt)} tokens) and --max-tokens {limit} exceed the model's {self.length} positions"
            )
        logits, cache = prefill_prompt(self._prefill, prompt, self.length)
        mask = self.allowed(kind)
        at_least = (
            config.min_tokens
            if config.min_tokens >= 0
            else (config.first_audio_frames if kind == "audio" else 1)
        )
        rng = np.random.default_rng(config.seed)
        out, first, first_audio, position = [], None, None, len(prompt)
        for _ in range(limit):
            p = np.where(mask, logits.numpy()[0].astype(np.float64), -np.inf)
            if len(out) < at_least:
                p[self.vocab.end(kind)] = -np.inf
            token = draw(p, config.temperature, rng)
            if first is None:
                first = time.perf_counter() - start
            if token == self.vocab.end(kind):
                break
            out.append(token)
            if echo is not None:
                echo(self._piece(token, kind))
            if kind == "audio" and first_audio is None and len(out) >= config.first_audio_frames:
                samples = self.tokens.decode_audio(out)  # what a player would start on
                first_audio = time.perf_counter() - start if len(samples) else None
            logits, cache = self._decode(tf.constant([token]), tf.constant(position), cache)
            position += 1
        seconds = time.perf_counter() - start
        result = {
            "respond_with": kind,
            "prompt": prompt,
            "min_tokens": at_least,
            "prompt_tokens": len(prompt),
            "tokens": len(out),
            "ids": out,
            "time_to_first_token_s": round(first if first is not None else seconds, 4),
            "seconds": round(seconds, 4),
            "tokens_per_sec": round(len(out) / (seconds - first), 1)
            if len(out) > 1 and seconds > first
            else None,
        }
        if kind == "audio":
            result["time_to_first_audio_s"] = round(first_audio, 4) if first_audio is not None else None
        if kind == "text":
            result["text"] = self.tokens.decode_text(out)
        return result

    def _piece(self, token: int, kind: str) -> str:
        if kind == "text" and self.tokens.sp is not None:
            return self.tokens.sp.id_to_piece(token).replace("\u2581", " ")
        return "."

    def write(self, result: dict, config: OmniGenerateConfig) -> None:
        from PIL import Image

        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        rate = self.vocab.media.sample_rate
        kind = result["respond_with"]
        if kind == "text":
            (out / "answer.txt").write_text(result["text"] + "\n")
        elif kind == "audio":
            write_wav(out / "answer.wav", self.tokens.decode_audio(result["ids"]), rate)
        else:
            Image.fromarray(self.tokens.decode_image(result["ids"])).save(out / "answer.png")
        # What the model heard or saw: the prompt's own codes (decode_* keep the codes of their kind).
        if config.prompt_audio:
            write_wav(out / "prompt.wav", self.tokens.decode_audio(result["prompt"]), rate)
        if config.prompt_image:
            Image.fromarray(self.tokens.decode_image(result["prompt"])).save(out / "prompt.png")
        (out / "result.json").write_text(
            json.dumps({k: v for k, v in result.items() if k not in ("ids", "prompt")}, indent=2)
        )


def generate(config: OmniGenerateConfig) -> dict:
    if config.respond_with not in RESPONSES:
        raise ConfigError(f"--respond-with {config.respond_with!r}: expected one of {', '.join(RESPONSES)}")
    if not (config.prompt_text or config.prompt_audio or config.prompt_image):
        raise ConfigError("give a prompt: --prompt-audio WAV, --prompt-text T or --prompt-image IMG")
    if config.max_tokens < 0 or config.temperature < 0 or config.first_audio_frames < 1:
        raise ConfigError("--max-tokens >= 0, --temperature >= 0, --first-audio-frames >= 1")
    for flag, path in (("--prompt-audio", config.prompt_audio), ("--prompt-image", config.prompt_image)):
        if path and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    responder = Responder(config.model)
    result = responder.answer(config, echo=lambda piece: print(piece, end="", flush=True, file=sys.stdout))
    print(file=sys.stdout)
    if config.output:
        responder.write(result, config)
    return {k: v for k, v in result.items() if k not in ("ids", "prompt")}
