"""Mixed-media examples made on this machine, nothing downloaded: what the omni tests, demo and benchmark
ingest.

* speech: espeak-ng (a Debian package `make` installs) speaks sentences into WAV files, with several of
  its voices;
* photographs: the ones scikit-image, scikit-learn and matplotlib ship (`images_data.PHOTOS`), cut into
  crops;
* video: frames panning across a photograph, with a spoken sentence as its audio track, encoded as MP4
  by the ffmpeg that imageio-ffmpeg ships (and, for the folder form, the frames as PNG files with
  ``audio.wav`` beside them).

`write_manifest` writes the media and ``manifest.jsonl``: speech with its transcript, captions with their
photograph and back, a spoken description with the photograph, videos between text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

# imageio-ffmpeg's writer forks with a Python preexec_fn unless this is set; in a process with threads
# (TensorFlow's, gRPC's) such a fork can hang (imageio-ffmpeg issue 58).
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

from headrace.pipelines.images_data import PHOTOS, photo

__all__ = ["espeak_available", "speak", "write_manifest", "write_video"]

SENTENCES = {
    "astronaut": "an astronaut in a white suit",
    "cat": "a cat sitting on a chair",
    "coffee": "a cup of coffee on a table",
    "rocket": "a rocket on the launch pad",
    "motorcycle": "a red motorcycle parked outside",
    "hubble": "galaxies in the deep sky",
    "camera": "a man holding a camera",
    "china": "a temple in the summer",
    "flower": "a flower in the garden",
    "hopper": "a portrait of an admiral",
}
VOICES = ("en", "en-us", "en+f3", "en+m3")


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, path: str | os.PathLike, *, voice: str = "en", speed: int = 160) -> Path:
    """A WAV of `text` spoken by espeak-ng (22,050 Hz mono)."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (`make install-media` installs it)")
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True
    )
    return Path(path)


def _crop(name: str, rng, size: int = 160):
    from PIL import Image

    image = photo(name)
    side = int(min(image.size) * rng.uniform(0.55, 0.95))
    left = int(rng.integers(0, image.width - side + 1))
    top = int(rng.integers(0, image.height - side + 1))
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def write_video(
    path: str | os.PathLike,
    name: str,
    wav: str | os.PathLike | None,
    *,
    seconds: float = 3.0,
    fps: int = 8,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """An MP4 panning across photograph `name` for `seconds`, with `wav` as its audio track (AAC)."""
    import imageio_ffmpeg
    from PIL import Image

    image = photo(name)
    side = int(min(image.size) * 0.6)
    rng = np.random.default_rng(seed)
    x0, y0 = rng.integers(0, image.width - side + 1), rng.integers(0, image.height - side + 1)
    x1, y1 = rng.integers(0, image.width - side + 1), rng.integers(0, image.height - side + 1)
    count = max(1, int(seconds * fps))
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (size, size),
        fps=fps,
        macro_block_size=16,
        ffmpeg_log_level="error",
        audio_path=str(wav) if wav else None,
        audio_codec="aac" if wav else None,
        output_params=["-shortest"] if wav else None,
    )
    writer.send(None)
    for i in range(count):
        t = i / max(count - 1, 1)
        x, y = int(x0 + (x1 - x0) * t), int(y0 + (y1 - y0) * t)
        frame = image.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
        writer.send(np.ascontiguousarray(np.asarray(frame, np.uint8)))
    writer.close()
    return Path(path)


def write_manifest(root: str | os.PathLike, *, repeats: int = 1, videos: int = 2, seed: int = 0) -> Path:
    """Media and ``ROOT/manifest.jsonl`` (paths relative to ROOT): per photograph and repeat, speech ->
    transcript, caption -> photograph, photograph -> caption, caption -> speech; `videos` MP4 videos
    and one folder of frames. Returns the manifest's path."""
    from PIL import Image

    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    examples = []
    names = list(PHOTOS)
    for r in range(repeats):
        for i, name in enumerate(names):
            sentence = SENTENCES[name]
            wav = f"media/{name}-{r}.wav"
            speak(sentence, root / wav, voice=VOICES[(i + r) % len(VOICES)], speed=150 + 10 * (r % 3))
            picture = f"media/{name}-{r}.{'jpg' if (i + r) % 2 else 'png'}"
            _crop(name, rng).save(root / picture)
            examples += [
                [{"audio": wav}, {"text": sentence}],
                [{"text": f"show me {sentence}"}, {"image": picture}],
                [{"image": picture}, {"text": sentence}],
                [{"text": f"say {sentence}"}, {"audio": wav}],
            ]
    for v in range(videos):
        name = names[v % len(names)]
        mp4 = f"media/{name}-video{v}.mp4"
        write_video(root / mp4, name, root / f"media/{name}-0.wav", seed=seed + v)
        examples.append([{"text": "what is in this video"}, {"video": mp4}, {"text": SENTENCES[name]}])
    folder = root / "media" / "frames0"
    folder.mkdir(exist_ok=True)
    for j in range(3):
        _crop(names[0], rng, size=96).save(folder / f"{j:03d}.png")
    shutil.copy(root / f"media/{names[0]}-0.wav", folder / "audio.wav")
    examples.append([{"video": "media/frames0"}, {"text": SENTENCES[names[0]]}])
    Image.new("RGB", (8, 8)).save(root / "media" / "tiny.png")  # unused: a file no example names
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return manifest
