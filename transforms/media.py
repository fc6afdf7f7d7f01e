"""Media front ends of the omni path: audio as log-mel frames, images as patches, video as sampled frames
plus its audio track, and the way back from each (`omni-ingest` tokenises with these; `generate omni`
detokenises with them).

Audio (`Media.log_mel`): mono, resampled to `sample_rate`, a Hann-windowed STFT (`win` samples every
`hop`, zero-padded to `n_fft`), magnitudes through a mel filterbank of `n_mels` triangles (HTK mel
scale, 0 Hz to Nyquist), then ``log(mel + 1e-4)``: one frame every ``hop / sample_rate`` seconds (20 ms by
default), the vector the audio codebook quantises. Back (`Media.waveform`): mel -> linear magnitudes by
the filterbank's pseudo-inverse (clipped at 0), then Griffin-Lim (Griffin & Lim 1984): phases are
re-estimated by alternating an inverse and a forward STFT, `griffin_lim_iters` times, starting from
phases drawn from a fixed seed, so the same frames give the same samples.

Images (`Media.patches`): upright RGB (EXIF orientation, alpha over white: `decode_image` of
image-ingest), centre-cropped to a square, resized to `image_size`, cut into `patch` x `patch` patches
in raster order: ``(image_size / patch)^2`` vectors of ``patch * patch * 3`` values in 0..255 (Chameleon
quantises 16 x 16 patches of a 512 x 512 image the same way, with a learned encoder in front).

Video (`Media.video`): frames sampled at `video_fps` through the image front end, and the audio track
(ffmpeg from imageio-ffmpeg, which ships the binary; TensorFlow-IO's video ops do not load here) through
the audio front end, cut into the audio frames that play during each sampled frame. A folder of frames
(any image files, in name order) is a video at `video_fps`, with ``audio.wav`` in it as its track.

Every reader raises `MediaError` naming what is wrong; callers add the file.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import subprocess
from pathlib import Path

import numpy as np

__all__ = ["Media", "MediaError", "VideoFeatures", "log_mel_distance", "psnr", "read_wav", "write_wav"]

_LOG_FLOOR = 1e-4
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class MediaError(ValueError):
    """A media file that cannot be read as what it was declared to be; the message says why."""


@dataclasses.dataclass(frozen=True)
class VideoFeatures:
    frames: list  # per sampled frame: patches [P, D] float32
    audio: list  # per sampled frame: log-mel frames [T_j, n_mels] float32 (empty without a track)


# -------------------------------------------------------------------------------------------------
# Files
# -------------------------------------------------------------------------------------------------


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(mono samples in [-1, 1] float32, sample rate) of a RIFF/WAVE file's bytes (PCM 8/16/24/32-bit or
    float); `MediaError` for anything else."""
    from scipy.io import wavfile

    if not data:
        raise MediaError("empty file")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MediaError("not a WAV file (no RIFF/WAVE header)")
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared > len(data) and declared < 0xFFFFFFF0:  # streaming writers leave 0xFFFFFFFF: unknown
        raise MediaError(
            f"corrupt WAV file: truncated ({len(data)} of the {declared} bytes its header declares)"
        )
    try:
        rate, samples = wavfile.read(io.BytesIO(data))
    except (ValueError, EOFError, OSError) as exc:
        raise MediaError(f"corrupt WAV file: {exc}") from None
    if samples.dtype == np.uint8:
        x = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.integer):
        x = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    else:
        x = samples.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if not np.all(np.isfinite(x)):
        raise MediaError("WAV samples are not finite")
    return x, int(rate)


def write_wav(target, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM mono, to a path or a binary file object."""
    from scipy.io import wavfile

    pcm = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    wavfile.write(target if hasattr(target, "write") else str(target), rate, (pcm * 32767).astype(np.int16))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (or patch sets) of values in 0..peak."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def log_mel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two log-mel frame sets [T, n_mels] (natural-log units; the shorter
    length is compared)."""
    n = min(len(a), len(b))
    return float(np.mean(np.abs(np.asarray(a[:n], np.float64) - np.asarray(b[:n], np.float64))))


def _last_line(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    return text.splitlines()[-1] if text else "ffmpeg failed"


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@dataclasses.dataclass(frozen=True)
class Media:
    """The front ends' settings (stored with the vocabulary, so that detokenising matches ingest)."""

    sample_rate: int = 16000
    win: int = 640  # 40 ms
    hop: int = 320  # 20 ms: 50 audio frames (tokens) per second
    n_fft: int = 1024
    n_mels: int = 40
    griffin_lim_iters: int = 32
    image_size: int = 64
    patch: int = 8
    video_fps: float = 1.0
    max_seconds: float = 60.0  # longer audio or video is rejected (a token budget, not a limit of the code)

    def check(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"--image-size {self.image_size} is not a multiple of --patch {self.patch}")
        if not 0 < self.hop <= self.win <= self.n_fft:
            raise ValueError("audio frames need 0 < hop <= win <= n_fft")
        if self.video_fps <= 0:
            raise ValueError(f"--video-fps {self.video_fps}: must be > 0")

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * 3

    # -- audio ------------------------------------------------------------------------------------

    def _window(self) -> np.ndarray:
        return np.hanning(self.win + 1)[:-1].astype(np.float64)  # periodic Hann

    def mel_filters(self) -> np.ndarray:
        """[n_mels, n_fft // 2 + 1] triangles, equally spaced on the mel scale from 0 Hz to Nyquist."""
        bins = self.n_fft // 2 + 1
        freqs = np.linspace(0, self.sample_rate / 2, bins)
        edges = _mel_to_hz(np.linspace(0, _hz_to_mel(self.sample_rate / 2), self.n_mels + 2))
        filters = np.zeros((self.n_mels, bins))
        for m in range(self.n_mels):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            rising = (freqs - lo) / max(mid - lo, 1e-9)
            falling = (hi - freqs) / max(hi - mid, 1e-9)
            filters[m] = np.maximum(0.0, np.minimum(rising, falling))
        return filters

    def _stft(self, x: np.ndarray) -> np.ndarray:
        """[frames, n_fft // 2 + 1] complex; frame t is centred on sample t * hop (reflect-padded)."""
        pad = self.win // 2
        x = np.pad(np.asarray(x, np.float64), (pad, pad), mode="reflect" if len(x) > pad else "constant")
        count = 1 + max(0, (len(x) - self.win) // self.hop)
        index = np.arange(self.win)[None, :] + self.hop * np.arange(count)[:, None]
        return np.fft.rfft(x[index] * self._window(), n=self.n_fft, axis=1)

    def _istft(self, spectrum: np.ndarray, length: int) -> np.ndarray:
        frames = np.fft.irfft(spectrum, n=self.n_fft, axis=1)[:, : self.win] * self._window()
        total = self.win + self.hop * (len(frames) - 1)
        out, norm = np.zeros(total), np.zeros(total)
        square = self._window() ** 2
        for t, frame in enumerate(frames):
            out[t * self.hop : t * self.hop + self.win] += frame
            norm[t * self.hop : t * self.hop + self.win] += square
        out /= np.maximum(norm, 1e-8)
        pad = self.win // 2
        return out[pad : pad + length]

    def log_mel(self, samples: np.ndarray, rate: int | None = None) -> np.ndarray:
        """[frames, n_mels] float32 log-mel frames of mono samples (resampled to `sample_rate`)."""
        x = _resample(np.asarray(samples, np.float32), rate or self.sample_rate, self.sample_rate)
        if len(x) == 0:
            return np.zeros((0, self.n_mels), np.float32)
        magnitude = np.abs(self._stft(x))  # [frames, bins]
        # An elementwise product and sum rather than a matrix product: BLAS rounds differently by kernel
        # and thread, and a frame at a near-tie between two codes then took another code in Flink's SDK
        # harness than in process; this arithmetic is the same everywhere.
        filters = self.mel_filters()[None, :, :]
        mel = np.concatenate(  # in blocks of 256 frames: bounds the [frames, n_mels, bins] product
            [np.sum(magnitude[i : i + 256, None, :] * filters, axis=2) for i in range(0, len(magnitude), 256)]
        )  # [frames, n_mels]
        return np.log(mel + _LOG_FLOOR).astype(np.float32)

    def audio(self, data: bytes) -> np.ndarray:
        """The log-mel frames of a WAV file's bytes."""
        samples, rate = read_wav(data)
        if len(samples) == 0:
            raise MediaError("WAV file holds no samples")
        if len(samples) / rate > self.max_seconds:
            raise MediaError(f"audio of {len(samples) / rate:.1f} s is longer than {self.max_seconds:g} s")
        return self.log_mel(samples, rate)

    def waveform(self, frames: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """Samples at `sample_rate` whose log-mel frames approximate `frames` (Griffin-Lim)."""
        frames = np.asarray(frames, np.float64)
        if len(frames) == 0:
            return np.zeros(0, np.float32)
        mel = np.maximum(np.exp(frames) - _LOG_FLOOR, 0.0)  # [T, n_mels]
        magnitude = np.maximum(mel @ np.linalg.pinv(self.mel_filters()).T, 0.0)  # [T, bins]
        length = self.hop * (len(frames) - 1)
        rng = np.random.default_rng(seed)
        phase = np.exp(2j * np.pi * rng.random(magnitude.shape))
        x = self._istft(magnitude * phase, length)
        for _ in range(self.griffin_lim_iters):
            spectrum = self._stft(x)[: len(magnitude)]
            if len(spectrum) < len(magnitude):
                spectrum = np.pad(spectrum, ((0, len(magnitude) - len(spectrum)), (0, 0)))
            x = self._istft(magnitude * np.exp(1j * np.angle(spectrum)), length)
        peak = np.max(np.abs(x)) if len(x) else 0.0
        return (x / peak * 0.9 if peak > 1.0 else x).astype(np.float32)

    # -- images -----------------------------------------------------------------------------------

    def _square(self, image):
        from PIL import Image

        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        return square.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)

    def image_array(self, data: bytes) -> np.ndarray:
        """[image_size, image_size, 3] uint8 of an image file's bytes (upright RGB, centre square)."""
        from PIL import Image

        from headrace.transforms.imagefiles import decode_image

        try:
            jpeg, _, _, _ = decode_image(data, max_side=4096, quality=95)
        except ValueError as exc:
            raise MediaError(str(exc)) from None
        return np.asarray(self._square(Image.open(io.BytesIO(jpeg)).convert("RGB")), np.uint8)

    def to_patches(self, pixels: np.ndarray) -> np.ndarray:
        """[S, S, 3] -> [P, patch * patch * 3] float32, patches in raster order."""
        s, p = self.image_size, self.patch
        grid = np.asarray(pixels, np.float32).reshape(s // p, p, s // p, p, 3)
        return grid.transpose(0, 2, 1, 3, 4).reshape(-1, p * p * 3)

    def from_patches(self, patches: np.ndarray) -> np.ndarray:
        """[P, patch * patch * 3] -> [S, S, 3] uint8 (`to_patches` undone)."""
        s, p = self.image_size, self.patch
        grid = np.asarray(patches, np.float32).reshape(s // p, s // p, p, p, 3).transpose(0, 2, 1, 3, 4)
        return np.clip(np.round(grid.reshape(s, s, 3)), 0, 255).astype(np.uint8)

    def patches(self, data: bytes) -> np.ndarray:
        return self.to_patches(self.image_array(data))

    # -- video ------------------------------------------------------------------------------------

    def _split_audio(self, mel: np.ndarray, frames: int) -> list:
        """Audio frames that play during each of `frames` sampled video frames."""
        per = self.frames_per_second / self.video_fps
        bounds = [min(len(mel), round(j * per)) for j in range(frames + 1)]
        bounds[-1] = len(mel) if frames else 0
        return [mel[bounds[j] : bounds[j + 1]] for j in range(frames)]

    def video(self, path: str) -> VideoFeatures:
        """A video file (anything the shipped ffmpeg decodes) or a folder of frames."""
        if os.path.isdir(path):
            return self._frame_folder(Path(path))
        # ffmpeg samples the frames, crops the centre square and scales it (Lanczos), writing raw RGB.
        # It is run here with subprocess, not through imageio-ffmpeg's reader: that one forks with a
        # Python preexec_fn, which hung in the SDK harness's threads (a fork in a threaded process).
        s = self.image_size
        chain = f"fps={self.video_fps:g},crop=min(iw\\,ih):min(iw\\,ih),scale={s}:{s}:flags=lanczos"
        done = self._ffmpeg(
            [
                "-t",
                f"{self.max_seconds + 1 / self.video_fps:g}",
                "-i",
                path,
                "-an",
                "-vf",
                chain,
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ]
        )
        if done.returncode != 0:
            raise MediaError(f"video does not decode: {_last_line(done.stderr)}")
        size = s * s * 3
        count = len(done.stdout) // size
        if count > self.max_seconds * self.video_fps:
            raise MediaError(f"video is longer than {self.max_seconds:g} s")
        pixels = np.frombuffer(done.stdout[: count * size], np.uint8).reshape(count, s, s, 3)
        frames = [self.to_patches(frame) for frame in pixels]
        if not frames:
            raise MediaError("video has no frames")
        mel = self._video_audio(path)
        return VideoFeatures(frames, self._split_audio(mel, len(frames)) if len(mel) else [])

    def _video_audio(self, path: str) -> np.ndarray:
        """The audio track's log-mel frames, or none when the file has no audio stream."""
        done = self._ffmpeg(
            [
                "-t",
                f"{self.max_seconds:g}",
                "-i",
                path,
                "-vn",
                "-ac",
                "1",
                "-ar",
                str(self.sample_rate),
                "-f",
                "s16le",
                "-",
            ]
        )
        if done.returncode != 0 or not done.stdout:
            err = done.stderr.decode(errors="replace")
            if done.returncode == 0 or "does not contain any stream" in err or "matches no streams" in err:
                return np.zeros((0, self.n_mels), np.float32)
            raise MediaError(f"audio track does not decode: {_last_line(done.stderr)}")
        samples = np.frombuffer(done.stdout, np.int16).astype(np.float32) / 32767.0
        return self.log_mel(samples)

    @staticmethod
    def _ffmpeg(args: list[str]) -> subprocess.CompletedProcess:
        """The ffmpeg imageio-ffmpeg ships, in a session of its own (no Ctrl-C from the terminal)."""
        import imageio_ffmpeg

        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", *args]
        try:
            return subprocess.run(
                command, capture_output=True, timeout=300, check=False, start_new_session=True
            )
        except subprocess.TimeoutExpired:
            raise MediaError("ffmpeg took over 300 s") from None

    def _frame_folder(self, folder: Path) -> VideoFeatures:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
        if not files:
            raise MediaError("folder of frames holds no image files")
        if len(files) / self.video_fps > self.max_seconds:
            raise MediaError(f"{len(files)} frames at {self.video_fps:g}/s exceed {self.max_seconds:g} s")
        frames = []
        for f in files:
            try:
                frames.append(self.patches(f.read_bytes()))
            except MediaError as exc:
                raise MediaError(f"frame {f.name}: {exc}") from None
        track = folder / "audio.wav"
        if not track.is_file():
            return VideoFeatures(frames, [])
        try:
            mel = self.audio(track.read_bytes())
        except MediaError as exc:
            raise MediaError(f"audio.wav: {exc}") from None
        return VideoFeatures(frames, self._split_audio(mel, len(frames)))
