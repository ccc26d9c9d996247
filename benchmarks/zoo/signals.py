"""Structured synthetic audio: formant speech, spoken 'words', harmonic melodies, and noise at an SNR.

Nothing here is bare noise: speech is a glottal pulse train with a moving pitch through vowel formant
resonators, with fricative bursts and pauses; music is harmonic notes with attack/decay envelopes.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import butter, lfilter

# (F1, F2, F3) in Hz for a few vowels: a, e, i, o, u, schwa.
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                   [570, 840, 2410], [300, 870, 2240], [500, 1500, 2500]], float)


def _resonator(x, f, bw, sr):
    """Two-pole resonance at f Hz with bandwidth bw (a formant)."""
    r = np.exp(-np.pi * bw / sr)
    a = [1.0, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
    return lfilter([1 - r], a, x)


def _syllable(rng, sr, dur, f0, vowel, fricative):
    n = int(dur * sr)
    t = np.arange(n) / sr
    pitch = f0 * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)) * np.linspace(1.05, 0.95, n)
    phase = np.cumsum(pitch / sr)
    pulses = (phase % 1.0) ** 3 - 0.25  # crude glottal flow derivative: sharp closure once a period
    v = sum(_resonator(pulses, f, 60 + 0.05 * f, sr) / (k + 1) for k, f in enumerate(VOWELS[vowel]))
    env = np.minimum(1, np.minimum(t / 0.02, (dur - t) / 0.04)).clip(0)
    out = v * env
    if fricative:  # a short /s/ or /f/-like burst before the vowel
        m = int(0.06 * sr)
        b, a = butter(2, [min(3000, sr / 2 - 2000), min(7000, sr / 2 - 100)], btype="band", fs=sr)
        out[:m] += lfilter(b, a, rng.normal(0, 0.3, m)) * np.hanning(m)
    return out


def speech(rng, sr=16000, seconds=3.0, f0=None, trailing_silence=0.0):
    """Speech-like signal: syllables with pitch declination, formants, fricatives and pauses."""
    f0 = f0 or rng.uniform(90, 230)
    parts, total = [], int((seconds - trailing_silence) * sr)
    while sum(map(len, parts)) < total:
        if rng.random() < 0.15:
            parts.append(np.zeros(int(rng.uniform(0.08, 0.3) * sr)))
        else:
            parts.append(_syllable(rng, sr, rng.uniform(0.12, 0.3), f0 * rng.uniform(0.85, 1.15),
                                   rng.integers(len(VOWELS)), rng.random() < 0.3))
        f0 *= 0.985  # declination
    x = np.concatenate(parts)[:total]
    x = np.concatenate([x, np.zeros(int(seconds * sr) - len(x))])
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def word(word_id, rng, sr=16000, seconds=1.5):
    """A spoken 'word': a fixed syllable sequence per word_id, said by a random speaker at a random rate."""
    plan = np.random.default_rng(1000 + word_id)
    sylls = [(plan.integers(len(VOWELS)), plan.random() < 0.4, plan.uniform(0.12, 0.22))
             for _ in range(plan.integers(2, 4))]
    f0, rate = rng.uniform(90, 220), rng.uniform(0.85, 1.15)
    x = np.concatenate([_syllable(rng, sr, d * rate, f0, v, fr) for v, fr, d in sylls])
    lead = int(rng.uniform(0.05, 0.3) * sr)
    out = np.zeros(int(seconds * sr))
    x = x[: len(out) - lead]
    out[lead:lead + len(x)] = x
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def melody(rng, sr=22050, seconds=2.0, poly=1):
    """Harmonic notes (MIDI 48-84) with attack and exponential decay; poly voices at once."""
    n = int(seconds * sr)
    out = np.zeros(n)
    for _ in range(poly):
        t0 = 0
        while t0 < n:
            dur = int(rng.uniform(0.15, 0.6) * sr)
            f = 440 * 2 ** ((rng.integers(48, 85) - 69) / 12)
            t = np.arange(min(dur, n - t0)) / sr
            tone = sum(np.sin(2 * np.pi * f * k * t) / k ** 1.5 for k in range(1, 6) if f * k < sr / 2)
            out[t0:t0 + len(t)] += tone * np.minimum(1, t / 0.01) * np.exp(-t * rng.uniform(2, 6))
            t0 += dur + int(rng.uniform(0, 0.1) * sr)
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def hum(rng, sr=16000, seconds=2.0):
    """A sung/hummed line: a voiced vowel whose pitch glides between notes, with short breaths."""
    n, out, t0 = int(seconds * sr), [], 0
    while t0 < n:
        d = rng.uniform(0.2, 0.5)
        seg = _syllable(rng, sr, d, 440 * 2 ** ((rng.integers(45, 72) - 69) / 12), rng.integers(len(VOWELS)), False)
        out += [seg, np.zeros(int(rng.uniform(0, 0.08) * sr))]
        t0 += len(seg) + len(out[-1])
    x = np.concatenate(out)[:n]
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def noisy(x, rng, snr_db):
    """x plus pink-ish (low-passed) noise at snr_db."""
    b, a = butter(1, 0.3)
    noise = lfilter(b, a, rng.normal(size=len(x)))
    noise *= np.sqrt(np.mean(x ** 2) / (np.mean(noise ** 2) + 1e-12) / 10 ** (snr_db / 10))
    return np.clip(x + noise, -1, 1).astype(np.float32)
