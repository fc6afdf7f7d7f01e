"""One token space for text, audio, image and video: the omni path's vocabulary, streams and tokenisers.

The vocabulary is one table with an offset per modality (what `train omni` embeds, one row per id):

    [0, T)              text: the SentencePiece ids (0 padding, 1 unknown, 2 end of document)
    [T, T + 10)         <text> </text> <audio> </audio> <image> </image> <video> </video> <frame> <end>
    [A, A + K)          audio codes: the audio codebook's centroids (log-mel frames), A = T + 10
    [I, I + K)          image codes: the image codebook's centroids (patches), I = A + K

An example is one stream: each part between its modality's begin and end tokens, in the manifest's
order, then <end>. A video part is ``<video> (<frame> image codes, audio codes of that frame)* </video>``:
its sampled frames interleaved with the audio that plays during each. Every token also carries the
modality id of its part (`MODALITY_ID`: 0 padding, 1 text, 2 audio, 3 image, 4 video), so the boundaries
can be read back without the vocabulary.

`OmniTokenizer` loads an `omni-ingest` output (``vocab.json``, ``tokenizer.model``, ``codebooks.npz``)
and goes both ways: media to tokens through the same front ends and codebooks ingest used, and tokens
back to text, an image (codebook patches) or audio (codebook log-mel frames through Griffin-Lim).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from headrace.transforms.kmeans import assign
from headrace.transforms.media import Media, VideoFeatures

__all__ = [
    "CODEBOOKS",
    "MODALITIES",
    "MODALITY_ID",
    "SPECIALS",
    "TOKENIZER",
    "VOCAB",
    "OmniTokenizer",
    "Vocabulary",
    "encode_part",
    "split_stream",
]

MODALITIES = ("text", "audio", "image", "video")
MODALITY_ID = {"text": 1, "audio": 2, "image": 3, "video": 4}
SPECIALS = (*tuple(f"<{t}{m}>" for m in MODALITIES for t in ("", "/")), "<frame>", "<end>")
VOCAB, TOKENIZER, CODEBOOKS = "vocab.json", "tokenizer.model", "codebooks.npz"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    text_size: int
    codebook_size: int
    media: Media = dataclasses.field(default_factory=Media)

    def special(self, name: str) -> int:
        return self.text_size + SPECIALS.index(name)

    def begin(self, modality: str) -> int:
        return self.special(f"<{modality}>")

    def end(self, modality: str) -> int:
        return self.special(f"</{modality}>")

    @property
    def audio_offset(self) -> int:
        return self.text_size + len(SPECIALS)

    @property
    def image_offset(self) -> int:
        return self.audio_offset + self.codebook_size

    @property
    def size(self) -> int:
        return self.image_offset + self.codebook_size

    def range(self, kind: str) -> tuple[int, int]:
        """[start, stop) of a kind of content token: text, audio or image codes."""
        return {
            "text": (0, self.text_size),
            "audio": (self.audio_offset, self.image_offset),
            "image": (self.image_offset, self.size),
        }[kind]

    def to_json(self) -> dict:
        return {
            "size": self.size,
            "text_size": self.text_size,
            "codebook_size": self.codebook_size,
            "offsets": {
                "text": 0,
                "specials": self.text_size,
                "audio": self.audio_offset,
                "image": self.image_offset,
            },
            "specials": {name: self.special(name) for name in SPECIALS},
            "modality_ids": MODALITY_ID,
            "media": dataclasses.asdict(self.media),
        }

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        return cls(data["text_size"], data["codebook_size"], Media(**data["media"]))


def encode_part(part, vocab: Vocabulary, sp, codebooks: dict) -> tuple[list[int], str]:
    """(token ids with the part's begin/end tokens, modality) of one decoded part: ``("text", str)``,
    ``("audio", frames)``, ``("image", patches)`` or ``("video", VideoFeatures)``."""
    kind, value = part
    if kind == "text":
        body = list(sp.encode(value)) if sp is not None else []
    elif kind == "audio":
        body = (assign(value, codebooks["audio"])[0] + vocab.audio_offset).tolist()
    elif kind == "image":
        body = (assign(value, codebooks["image"])[0] + vocab.image_offset).tolist()
    else:
        video: VideoFeatures = value
        body = []
        for j, patches in enumerate(video.frames):
            body.append(vocab.special("<frame>"))
            body += (assign(patches, codebooks["image"])[0] + vocab.image_offset).tolist()
            if video.audio and len(video.audio[j]):
                body += (assign(video.audio[j], codebooks["audio"])[0] + vocab.audio_offset).tolist()
    return [vocab.begin(kind), *body, vocab.end(kind)], kind


def split_stream(tokens, vocab: Vocabulary) -> list[tuple[str, list[int]]]:
    """The parts of a token stream, ``[(modality, content ids without begin/end)]``, in order; a part
    left open (no end token: a generation cut short) is returned as it stands."""
    begins = {vocab.begin(m): m for m in MODALITIES}
    ends = {vocab.end(m): m for m in MODALITIES}
    parts, current, body = [], None, []
    for t in (int(t) for t in tokens):
        if current is None:
            if t in begins:
                current, body = begins[t], []
        elif t == vocab.end(current):
            parts.append((current, body))
            current = None
        elif t not in ends:
            body.append(t)
    if current is not None:
        parts.append((current, body))
    return parts


class OmniTokenizer:
    """An `omni-ingest` output's tokenisers, both ways (see the module docstring)."""

    def __init__(self, directory: str | Path):
        root = Path(directory)
        self.vocab = Vocabulary.from_json(json.loads((root / VOCAB).read_text()))
        self.media = self.vocab.media
        self.sp = None
        if (root / TOKENIZER).is_file():
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(root / TOKENIZER))
        books = np.load(root / CODEBOOKS)
        self.codebooks = {k: books[k] for k in ("audio", "image")}

    # -- to tokens --------------------------------------------------------------------------------

    def text(self, text: str) -> list[int]:
        if self.sp is None:
            raise ValueError("this omni-ingest output has no text vocabulary (its manifest held no text)")
        return encode_part(("text", text), self.vocab, self.sp, self.codebooks)[0]

    def audio(self, wav: bytes) -> list[int]:
        return encode_part(("audio", self.media.audio(wav)), self.vocab, self.sp, self.codebooks)[0]

    def image(self, data: bytes) -> list[int]:
        return encode_part(("image", self.media.patches(data)), self.vocab, self.sp, self.codebooks)[0]

    # -- back -------------------------------------------------------------------------------------

    def _codes(self, ids, kind: str) -> np.ndarray:
        start, stop = self.vocab.range(kind)
        ids = np.asarray([i for i in ids if start <= i < stop], np.int64) - start
        return ids[ids < len(self.codebooks[kind])]

    def decode_text(self, ids) -> str:
        start, stop = self.vocab.range("text")
        return self.sp.decode([int(i) for i in ids if start < i < stop]) if self.sp is not None else ""

    def audio_frames(self, ids) -> np.ndarray:
        """[T, n_mels] log-mel frames of the audio codes among `ids`."""
        return self.codebooks["audio"][self._codes(ids, "audio")]

    def decode_audio(self, ids) -> np.ndarray:
        """Samples at ``media.sample_rate`` of the audio codes among `ids` (Griffin-Lim)."""
        return self.media.waveform(self.audio_frames(ids))

    def decode_image(self, ids) -> np.ndarray:
        """[S, S, 3] uint8 from the image codes among `ids` (missing patches grey, extra ones dropped)."""
        codes = self._codes(ids, "image")[: self.media.patches_per_image]
        patches = np.full((self.media.patches_per_image, self.media.patch_dim), 128.0)
        patches[: len(codes)] = self.codebooks["image"][codes]
        return self.media.from_patches(patches)
