"""The omni path's media front ends: log-mel frames and their inverse, patches, WAV and video reading."""

from __future__ import annotations

import io

import numpy as np
import pytest

from headrace.pipelines.omni_data import espeak_available, speak, write_video
from headrace.transforms.media import Media, MediaError, log_mel_distance, read_wav, write_wav

MEDIA = Media()


def _wav(samples, rate: int) -> bytes:
    buffer = io.BytesIO()
    write_wav(buffer, samples, rate)
    return buffer.getvalue()


def test_a_tone_lands_in_the_mel_band_of_its_frequency():
    t = np.arange(16000) / 16000
    frames = MEDIA.log_mel(0.5 * np.sin(2 * np.pi * 1000 * t))
    assert frames.shape == (51, MEDIA.n_mels)  # one frame per 20 ms, centred frames at both ends
    peak = int(np.median(frames.argmax(axis=1)))
    filters = MEDIA.mel_filters()
    freqs = np.linspace(0, 8000, filters.shape[1])
    assert abs(freqs[filters[peak].argmax()] - 1000) < 150


def test_resampling_keeps_the_duration():
    for rate in (8000, 22050, 44100):
        samples = np.random.default_rng(rate).normal(0, 0.1, rate * 2).astype(np.float32)
        assert abs(len(MEDIA.audio(_wav(samples, rate))) - 100) <= 1  # 2 s at 50 frames/s


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make media-deps)")
def test_griffin_lim_brings_speech_back_to_its_log_mel_frames(tmp_path):
    wav = speak("the quick brown fox jumps over the lazy dog", tmp_path / "s.wav").read_bytes()
    frames = MEDIA.audio(wav)
    back = MEDIA.waveform(frames)
    assert abs(len(back) / MEDIA.sample_rate - len(read_wav(wav)[0]) / read_wav(wav)[1]) < 0.05
    error = log_mel_distance(frames, MEDIA.log_mel(back))
    noise = log_mel_distance(frames, MEDIA.log_mel(np.random.default_rng(0).normal(0, 0.1, len(back))))
    assert error < 0.5 and error < noise / 4, (error, noise)
    np.testing.assert_array_equal(back, MEDIA.waveform(frames))  # phases from a fixed seed


def test_wav_reading_accepts_pcm_widths_and_stereo_and_names_what_is_wrong():
    from scipy.io import wavfile

    x = np.sin(np.linspace(0, 100, 4000)).astype(np.float32) * 0.5
    for samples in (x, (x * 32767).astype(np.int16), (x * 2**31).astype(np.int32), np.stack([x, x], 1)):
        buffer = io.BytesIO()
        wavfile.write(buffer, 16000, samples)
        got, rate = read_wav(buffer.getvalue())
        assert rate == 16000 and got.shape == (4000,)
        np.testing.assert_allclose(got, x, atol=1e-3)
    with pytest.raises(MediaError, match="not a WAV file"):
        read_wav(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(MediaError, match="truncated"):
        read_wav(_wav(x, 16000)[:200])
    with pytest.raises(MediaError, match="empty file"):
        read_wav(b"")


def test_patches_round_trip_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    patches = MEDIA.to_patches(pixels)
    assert patches.shape == (64, 192)
    np.testing.assert_array_equal(patches[1], pixels[0:8, 8:16].reshape(-1))  # raster order
    np.testing.assert_array_equal(MEDIA.from_patches(patches), pixels)


def test_video_frames_are_sampled_at_the_rate_with_the_audio_that_plays_during_each(tmp_path):
    t = np.arange(int(16000 * 2.5)) / 16000
    (tmp_path / "a.wav").write_bytes(_wav(0.3 * np.sin(2 * np.pi * 440 * t), 16000))
    path = write_video(tmp_path / "v.mp4", "coffee", tmp_path / "a.wav", seconds=2.5, fps=8)
    video = Media(video_fps=2.0).video(str(path))
    assert len(video.frames) == 5 and all(f.shape == (64, 192) for f in video.frames)
    assert [len(a) for a in video.audio][:4] == [25, 25, 25, 25]  # 50 audio frames/s over 2 frames/s
    silent = Media().video(str(write_video(tmp_path / "s.mp4", "coffee", None, seconds=2, fps=4)))
    assert len(silent.frames) == 2 and silent.audio == []
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    with pytest.raises(MediaError, match="video does not decode"):
        MEDIA.video(str(tmp_path / "bad.mp4"))
