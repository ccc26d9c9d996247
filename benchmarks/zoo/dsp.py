"""librosa-compatible mel spectrogram in numpy (librosa >= 0.10 defaults: centred frames, zero padding,
periodic Hann window, Slaney mel scale and norm), as speechmos computes its AECMOS features."""
from __future__ import annotations

import numpy as np


def _hz_to_mel(f):
    f = np.asarray(f, float)
    lin = f / (200 / 3)
    return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-10) / 1000) / (np.log(6.4) / 27), lin)


def _mel_to_hz(m):
    m = np.asarray(m, float)
    return np.where(m >= 15, 1000 * np.exp((np.log(6.4) / 27) * (m - 15)), m * 200 / 3)


def mel_filters(sr, n_fft, n_mels):
    fft_f = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff, ramps = np.diff(mel_f), mel_f[:, None] - fft_f[None]
    lower, upper = -ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return w * (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]


def melspectrogram(y, sr, n_fft, hop_length, n_mels):
    """Power mel spectrogram [n_mels, frames] like librosa.feature.melspectrogram."""
    y = np.pad(y.astype(np.float64), n_fft // 2)
    n = 1 + (len(y) - n_fft) // hop_length
    frames = np.lib.stride_tricks.as_strided(y, (n, n_fft), (y.strides[0] * hop_length, y.strides[0]))
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
    return mel_filters(sr, n_fft, n_mels) @ power.T


def power_to_db(s, top_db=80.0):
    """librosa.power_to_db(s, ref=np.max)."""
    db = 10 * np.log10(np.maximum(s, 1e-10)) - 10 * np.log10(max(s.max(), 1e-10))
    return np.maximum(db, db.max() - top_db)
