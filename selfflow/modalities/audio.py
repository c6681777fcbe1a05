"""Spoken digits: synthesis (espeak-ng, or a procedural stand-in), log-mel spectrograms, Griffin-Lim, WAV.

The model sees a clip as a log-mel spectrogram ``(1, n_mels, frames)`` in [-1, 1], an image whose
rows are mel bands (row 0 = lowest) and whose columns are time frames; ``mel_to_wave`` turns one
back into sound without any vocoder weights. Definitions and constants: docs/modalities_audio.md.

- :func:`synthesize_digits`: n utterances of "zero" … "nine", each fully determined by (seed, i).
- :func:`log_mel` / :func:`mel_to_wave`: the spectrogram and its inverse up to phase (Griffin-Lim).
- :func:`write_wav` / :func:`read_wav`: 16-bit PCM mono; :func:`save_spectrograms`: a PNG grid.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
import subprocess
import wave as wavfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.signal
import torch

from selfflow.errors import DataError
from selfflow.files import atomic_file, load_tensors, save_tensors
from selfflow.imageio import save_grid

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

F_MAX = SAMPLE_RATE / 2     # the mel filterbank spans 0 .. 8000 Hz
TOP_DB = 0.0                # fixed top of the dB range: a full-scale sine on an FFT bin has power 0 dB
DYNAMIC_RANGE_DB = 80.0     # levels below TOP_DB − 80 dB are clamped (silence)
POWER_FLOOR = 1e-10         # 10·log10(max(power, 1e-10)): −100 dB, below the clamp
MIN_N_FFT = 512             # the shortest default window (32 ms): finer windows blur the low mel bands
GRIFFIN_LIM_MOMENTUM = 0.99  # fast Griffin-Lim (Perraudin, Balazs & Søndergaard 2013); librosa's default too

ESPEAK_RATE = 22050         # espeak-ng's output sample rate
ESPEAK_VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4")
ESPEAK_SPEED = (120, 200)   # words per minute (-s)
ESPEAK_PITCH = (25, 75)     # espeak pitch 0..99 (-p)
AMPLITUDE = (0.3, 0.9)      # peak of each utterance
MAX_OFFSET = 0.1            # seconds of random silence before the word starts
SYNTH_RECIPE = "spoken-digits/1"  # bump when the recipe changes: it is part of the cache key
SOURCES = ("auto", "espeak", "procedural")


# --------------------------------------------------------------------------------------------
# synthesis
# --------------------------------------------------------------------------------------------
def espeak_available() -> bool:
    """Whether the espeak-ng program is on PATH."""
    return shutil.which("espeak-ng") is not None


@lru_cache(maxsize=1)
def espeak_version() -> str:
    """espeak-ng's version line (part of the cache key: another version speaks differently)."""
    result = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def synthesize_digits(n: int, *, seed: int = 0, source: str = "auto", duration: float = 0.8,
                      cache_dir: str | Path | None = None,
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """n utterances of spoken digits: waves float32 (n, round(duration·16000)) in [-1, 1], labels int64 (n,),
    and the source used ("espeak" or "procedural").

    source: "espeak" (a DataError saying how to install it when missing), "procedural" or "auto"
    (espeak-ng when installed, else the procedural stand-in; the choice is logged). Utterance i
    depends on (seed, i) only, never on n. espeak-ng results are cached in ``cache_dir`` (a
    safetensors file keyed by every argument, the recipe and the espeak-ng version).
    """
    samples = _check_synthesis_args(n, duration, source)
    source = _resolve_source(source)
    if source == "procedural":
        waves, labels = _synthesize(n, seed, samples, _procedural_utterance, progress, "procedural digits")
        return waves, labels, source
    cache = _cache_path(cache_dir, n, seed, duration)
    if cache is not None and cache.is_file():
        stored = load_tensors(cache)
        return stored["waves"], stored["labels"], source
    waves, labels = _synthesize(n, seed, samples, _espeak_utterance, progress, "espeak-ng digits")
    if cache is not None:
        with atomic_file(cache) as tmp:
            save_tensors({"waves": waves, "labels": labels}, tmp, metadata={"espeak": espeak_version()})
    return waves, labels, source


def _check_synthesis_args(n: int, duration: float, source: str) -> int:
    """The window length in samples; a DataError naming the first bad argument."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"synthesize_digits: n must be a positive integer, got {n!r}")
    if not isinstance(duration, (int, float)) or not 0.25 <= duration <= 10.0:
        raise DataError(f"synthesize_digits: duration must be in [0.25, 10] seconds, got {duration!r}")
    if source not in SOURCES:
        raise DataError(f"synthesize_digits: source must be one of {', '.join(SOURCES)}, got {source!r}")
    return round(duration * SAMPLE_RATE)


def _resolve_source(source: str) -> str:
    """"auto" → espeak when installed, else procedural (logged); "espeak" without it → DataError."""
    if source == "espeak" and not espeak_available():
        raise DataError("synthesize_digits: source 'espeak' needs the espeak-ng program, which is not installed "
                        "(apt-get install espeak-ng); or use source='procedural'")
    if source == "auto":
        source = "espeak" if espeak_available() else "procedural"
        logger.info("spoken digits: %s", "synthesised by espeak-ng" if source == "espeak" else
                    "espeak-ng is not installed, using the procedural stand-in (apt-get install espeak-ng)")
    return source


def _cache_path(cache_dir: str | Path | None, n: int, seed: int, duration: float) -> Path | None:
    """The cache file of these arguments, or None without a cache folder."""
    if cache_dir is None:
        return None
    key = json.dumps({"recipe": SYNTH_RECIPE, "n": n, "seed": seed, "duration": float(duration),
                      "sample_rate": SAMPLE_RATE, "espeak": espeak_version()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"spoken_digits_{n}_seed{seed}_{digest}.safetensors"


def _synthesize(n: int, seed: int, samples: int, utterance, progress: bool,
                desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Call ``utterance(rng, label)`` for i < n with its own generator, and window each result."""
    from tqdm.auto import tqdm

    waves = np.zeros((n, samples), np.float32)
    labels = np.zeros(n, np.int64)
    for i in tqdm(range(n), desc=desc, unit="utt", disable=not progress, dynamic_ncols=True):
        rng = np.random.default_rng([seed, i])
        labels[i] = rng.integers(len(WORDS))
        word = utterance(rng, int(labels[i]))
        amplitude = rng.uniform(*AMPLITUDE)
        offset = int(rng.uniform(0.0, MAX_OFFSET) * SAMPLE_RATE)
        waves[i] = _place(word, amplitude, offset, samples)
    return torch.from_numpy(waves), torch.from_numpy(labels)


def _place(word: np.ndarray, amplitude: float, offset: int, samples: int) -> np.ndarray:
    """The word scaled to peak ``amplitude``, starting at ``offset`` in a zero window of ``samples``."""
    out = np.zeros(samples, np.float32)
    peak = float(np.abs(word).max()) if word.size else 0.0
    if peak > 0:
        word = word[: max(0, samples - offset)] * (amplitude / peak)
        out[offset: offset + word.size] = word
    return out


def _espeak_utterance(rng: np.random.Generator, label: int) -> np.ndarray:
    """espeak-ng speaks WORDS[label] with a random voice, speed and pitch; 16 kHz, silence trimmed."""
    voice = f"{rng.choice(ESPEAK_VOICES)}+{rng.choice(ESPEAK_VARIANTS)}"
    speed, pitch = int(rng.integers(*ESPEAK_SPEED)), int(rng.integers(*ESPEAK_PITCH))
    command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", WORDS[label]]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise DataError(f"espeak-ng failed for {' '.join(command)}: {result.stderr.decode(errors='replace').strip()}")
    speech, rate = _decode_wav(io.BytesIO(result.stdout))
    speech = scipy.signal.resample_poly(speech.numpy().astype(np.float64), SAMPLE_RATE // 50, rate // 50)
    return _trim_silence(speech.astype(np.float32))


def _trim_silence(x: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """The part of x between the first and last sample above ``threshold`` × its peak."""
    loud = np.flatnonzero(np.abs(x) > threshold * max(float(np.abs(x).max()), 1e-12))
    return x[loud[0]: loud[-1] + 1] if loud.size else x[:0]


# The procedural stand-in: per digit, two formants gliding from (F1, F2) to (F1', F2') over the
# voiced part, a noise band (a fricative: centre Hz, strength, at the start or the end) and a length.
_DIGITS = (  # F1, F2 → F1', F2' (Hz), fricative centre (Hz), strength, at start?, length (s)
    (400, 2000, 450, 900, 4500, 0.5, True, 0.45),     # zero
    (300, 700, 650, 1200, 0, 0.0, True, 0.35),        # one
    (300, 1600, 300, 850, 3500, 0.7, True, 0.30),     # two
    (500, 1400, 300, 2300, 6000, 0.3, True, 0.40),    # three
    (550, 850, 450, 1100, 5000, 0.3, True, 0.40),     # four
    (750, 1250, 400, 2100, 5000, 0.4, False, 0.50),   # five
    (400, 1900, 400, 1900, 5500, 1.0, False, 0.45),   # six
    (550, 1800, 500, 1500, 5500, 0.8, True, 0.50),    # seven
    (550, 1800, 400, 2200, 3000, 0.5, False, 0.35),   # eight
    (750, 1250, 350, 2100, 0, 0.0, True, 0.50),       # nine
)


def _procedural_utterance(rng: np.random.Generator, label: int) -> np.ndarray:
    """A voiced harmonic sound with the digit's formant glide and fricative; jittered pitch, speed, formants."""
    f1, f2, g1, g2, fric_hz, fric_gain, fric_first, length = _DIGITS[label]
    speed, scale = rng.uniform(0.8, 1.25), rng.uniform(0.9, 1.1)  # time stretch; vocal-tract size
    n = int(length * speed * SAMPLE_RATE)
    n_fric = int(0.3 * n) if fric_gain else 0
    voiced = _voiced(rng, n - n_fric, (f1 * scale, f2 * scale), (g1 * scale, g2 * scale))
    noise = _fricative(rng, n_fric, fric_hz * scale) * fric_gain
    return np.concatenate([noise, voiced] if fric_first else [voiced, noise]).astype(np.float32)


def _voiced(rng: np.random.Generator, n: int, start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Harmonics of a falling f0, each weighted by two Gaussian formants gliding from start to end."""
    t = np.linspace(0.0, 1.0, n)
    f0 = rng.uniform(90.0, 250.0) * (1.1 - 0.2 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formants = [a + (b - a) * t for a, b in zip(start, end)]
    k = np.arange(1, 41)[:, None]
    freqs = k * f0[None, :]
    gain = sum(np.exp(-(((freqs - f) / 150.0) ** 2)) for f in formants) + 0.05 / k
    gain = np.where(freqs < 0.9 * F_MAX, gain, 0.0)
    return (gain * np.sin(k * phase[None, :])).sum(0) * _envelope(n)


def _fricative(rng: np.random.Generator, n: int, centre: float) -> np.ndarray:
    """White noise shaped by a Gaussian band (1 kHz wide) around ``centre`` Hz, with an envelope."""
    if n == 0:
        return np.zeros(0)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    band = np.fft.irfft(spectrum * np.exp(-(((freqs - centre) / 1000.0) ** 2)), n)
    return band / max(float(np.abs(band).max()), 1e-12) * _envelope(n)


def _envelope(n: int) -> np.ndarray:
    """Raised-cosine attack (20 ms) and release (50 ms), flat between."""
    attack, release = min(n, 320), min(n, 800)
    env = np.ones(n)
    env[:attack] *= 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, attack))
    env[n - release:] *= 0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, release))
    return env


# --------------------------------------------------------------------------------------------
# log-mel spectrogram and its inverse
# --------------------------------------------------------------------------------------------
def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 · log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`: 700 · (10^(m / 2595) − 1)."""
    return 700.0 * (10.0 ** (torch.as_tensor(m, dtype=torch.float64) / 2595.0) - 1.0)


def mel_edges(n_mels: int) -> torch.Tensor:
    """n_mels + 2 frequencies (Hz) equally spaced in mel over 0 .. 8000 Hz; band m spans edges m .. m+2."""
    return mel_to_hz(torch.linspace(0.0, float(hz_to_mel(F_MAX)), n_mels + 2, dtype=torch.float64))


def mel_triangles(freqs: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(n_mels, len(freqs)) float64: triangle m rises from edge m to 1 at edge m+1 and falls to 0 at edge m+2."""
    edges = mel_edges(n_mels)
    f = torch.as_tensor(freqs, dtype=torch.float64)[None, :]
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (f - lower) / (centre - lower), (upper - f) / (upper - centre)
    return torch.minimum(rising, falling).clamp(min=0.0)


def mel_filterbank(n_mels: int, n_fft: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32: the triangles sampled at the FFT bin frequencies k · 16000 / n_fft."""
    return mel_triangles(torch.arange(n_fft // 2 + 1) * SAMPLE_RATE / n_fft, n_mels).float()


def hop_length(samples: int, frames: int) -> int:
    """The hop that gives exactly ``frames`` frames with center=True (1 + samples // hop = frames)."""
    hop = samples // max(frames - 1, 1)
    if frames < 2 or hop < 1 or 1 + samples // hop != frames:
        raise DataError(f"log_mel: frames={frames} is not reachable from {samples} samples "
                        f"(needs 2 <= frames and samples >= frames·(frames−1))")
    return hop


def window_length(hop: int) -> int:
    """The default n_fft for a hop: the smallest power of two >= max(2·hop, 512), so windows overlap by half
    or more and every sample is weighted (:func:`check_coverage`)."""
    return max(MIN_N_FFT, 1 << (2 * hop - 1).bit_length())


def check_coverage(n_fft: int, hop: int, samples: int, frames: int) -> None:
    """Refuse a window shorter than two hops: Hann windows further apart leave samples with (almost) no weight."""
    if n_fft < 2 * hop:
        raise DataError(f"log_mel: n_fft={n_fft} leaves samples uncovered at hop={hop} ({frames} frames from "
                        f"{samples} samples): n_fft must be >= 2·hop = {2 * hop}, or leave it unset")


def db_to_unit(db: torch.Tensor) -> torch.Tensor:
    """dB clamped to [TOP_DB − 80, TOP_DB], mapped affinely to [-1, 1] (−80 dB → −1, 0 dB → 1)."""
    db = db.clamp(TOP_DB - DYNAMIC_RANGE_DB, TOP_DB)
    return (db - TOP_DB) / (DYNAMIC_RANGE_DB / 2) + 1.0


def unit_to_db(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`db_to_unit` on [-1, 1] (values outside are clamped first)."""
    return (x.clamp(-1.0, 1.0) - 1.0) * (DYNAMIC_RANGE_DB / 2) + TOP_DB


def _check_spectrogram_args(n_mels: int, n_fft: int) -> None:
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or not 2 <= n_mels <= 128:
        raise DataError(f"log_mel: n_mels must be an integer in [2, 128], got {n_mels!r}")
    if isinstance(n_fft, bool) or not isinstance(n_fft, int) or n_fft < 2 * n_mels or n_fft % 2:
        raise DataError(f"log_mel: n_fft must be an even integer >= 2·n_mels, got {n_fft!r}")


def _stft(waves: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Complex STFT (n, n_fft//2+1, frames), Hann window, center=True, scaled by 2 / Σwindow so that a
    unit-amplitude sine on a bin centre has magnitude 1."""
    window = torch.hann_window(n_fft, dtype=waves.dtype)
    spec = torch.stft(waves, n_fft, hop, window=window, center=True, return_complex=True)
    return spec * (2.0 / window.sum())


def _istft(spec: torch.Tensor, n_fft: int, hop: int, samples: int) -> torch.Tensor:
    """Inverse of :func:`_stft` (least-squares overlap-add)."""
    window = torch.hann_window(n_fft, dtype=spec.real.dtype)
    return torch.istft(spec * (window.sum() / 2.0), n_fft, hop, window=window, center=True, length=samples)


def log_mel(waves: torch.Tensor, *, n_mels: int = 32, frames: int = 32, n_fft: int | None = None) -> torch.Tensor:
    """(n, samples) → (n, 1, n_mels, frames) float32 in [-1, 1]: power STFT → mel → dB → fixed range → affine.

    n_fft: the window; None takes :func:`window_length` of the hop. A window shorter than two hops is refused.
    """
    waves = torch.as_tensor(waves, dtype=torch.float32)
    if waves.ndim != 2:
        raise DataError(f"log_mel: waves must be (n, samples), got shape {tuple(waves.shape)}")
    hop = hop_length(waves.shape[1], frames)
    n_fft = window_length(hop) if n_fft is None else n_fft
    _check_spectrogram_args(n_mels, n_fft)
    check_coverage(n_fft, hop, waves.shape[1], frames)
    power = _stft(waves, n_fft, hop).abs().square()
    mel = torch.einsum("mf,nft->nmt", mel_filterbank(n_mels, n_fft), power)
    return db_to_unit(10.0 * torch.log10(mel.clamp(min=POWER_FLOOR)))[:, None].float()


def griffin_lim(magnitude: torch.Tensor, *, samples: int, n_fft: int, hop: int, iterations: int = 64,
                seed: int = 0, momentum: float = GRIFFIN_LIM_MOMENTUM) -> torch.Tensor:
    """A wave (n, samples) whose STFT magnitude approaches ``magnitude`` (n, n_fft//2+1, frames).

    Fast Griffin-Lim (Perraudin, Balazs & Søndergaard 2013): each round takes the STFT X_k of the current
    wave, extrapolates it past the previous one, C_k = X_k − μ/(1+μ) · X_{k−1}, keeps C_k's phase and puts
    back the target magnitude. μ = 0 is the alternating projection of Griffin & Lim. The first phase is
    uniform random from ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * torch.rand(magnitude.shape, generator=generator))
    wave = _istft(magnitude * angles, n_fft, hop, samples)
    previous = torch.zeros_like(angles)
    for _ in range(iterations):
        rebuilt = _stft(wave, n_fft, hop)
        direction = rebuilt - (momentum / (1.0 + momentum)) * previous
        previous = rebuilt
        wave = _istft(magnitude * torch.sgn(direction), n_fft, hop, samples)
    return wave


def spectral_convergence(magnitude: torch.Tensor, wave: torch.Tensor, *, n_fft: int, hop: int) -> float:
    """‖ |STFT(wave)| − magnitude ‖_F / ‖magnitude‖_F: how far a wave is from a target magnitude."""
    return float((_stft(wave, n_fft, hop).abs() - magnitude).norm() / magnitude.norm().clamp(min=1e-12))


def mel_magnitude(mels: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Log-mel (n, 1, n_mels, frames) → linear STFT magnitude (n, n_fft//2+1, frames): undo the affine and
    the dB, then the filterbank's pseudo-inverse on power, clamped to be non-negative, square-rooted."""
    power = 10.0 ** (unit_to_db(mels[:, 0].double()) / 10.0)
    inverse = torch.linalg.pinv(mel_filterbank(mels.shape[2], n_fft).double())
    return torch.einsum("fm,nmt->nft", inverse, power).clamp(min=0.0).sqrt().float()


def resample_frames(mels: torch.Tensor, hop: int, fine_hop: int, samples: int) -> torch.Tensor:
    """Frames centred every ``hop`` samples → frames every ``fine_hop`` samples (linear in the log domain).

    Griffin-Lim needs frames that overlap by three quarters: at the spectrogram's own hop (half the window)
    the phase between frames is barely constrained.
    """
    times = torch.arange(1 + samples // fine_hop, dtype=torch.float64) * fine_hop / hop
    lower = times.floor().long().clamp(max=mels.shape[-1] - 1)
    upper = (lower + 1).clamp(max=mels.shape[-1] - 1)
    frac = (times - lower).clamp(0.0, 1.0).to(mels.dtype)
    return mels[..., lower] * (1 - frac) + mels[..., upper] * frac


def mel_to_wave(mels: torch.Tensor, *, samples: int, n_fft: int | None = None, iterations: int = 64,
                seed: int = 0, momentum: float = GRIFFIN_LIM_MOMENTUM) -> torch.Tensor:
    """Log-mel (n, 1, n_mels, frames) → waves (n, samples) float32 in [-1, 1], by fast Griffin-Lim.

    n_fft: the spectrogram's window (None: :func:`window_length`, as :func:`log_mel`). The frames are
    first resampled to a hop of at most n_fft / 4 (:func:`resample_frames`).
    """
    mels = torch.as_tensor(mels, dtype=torch.float32)
    if mels.ndim != 4 or mels.shape[1] != 1:
        raise DataError(f"mel_to_wave: mels must be (n, 1, n_mels, frames), got shape {tuple(mels.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise DataError(f"mel_to_wave: iterations must be a non-negative integer, got {iterations!r}")
    if not 0.0 <= momentum < 1.0:
        raise DataError(f"mel_to_wave: momentum must be in [0, 1), got {momentum!r}")
    hop = hop_length(samples, mels.shape[3])
    n_fft = window_length(hop) if n_fft is None else n_fft
    _check_spectrogram_args(mels.shape[2], n_fft)
    check_coverage(n_fft, hop, samples, mels.shape[3])
    fine_hop = max(1, hop // math.ceil(4 * hop / n_fft))
    magnitude = mel_magnitude(resample_frames(mels, hop, fine_hop, samples), n_fft)
    return griffin_lim(magnitude, samples=samples, n_fft=n_fft, hop=fine_hop, iterations=iterations,
                       seed=seed, momentum=momentum).clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def write_wav(path: str | Path, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a mono wave (samples,) in [-1, 1] as 16-bit PCM (round(x · 32767)), atomically."""
    wave = torch.as_tensor(wave, dtype=torch.float32).detach().cpu().squeeze()
    if wave.ndim != 1:
        raise DataError(f"write_wav: wave must be one channel (samples,), got shape {tuple(wave.shape)}")
    pcm = (wave.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).numpy()
    path = Path(path)
    with atomic_file(path) as tmp:
        with wavfile.open(str(tmp), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(int(sample_rate))
            handle.writeframes(pcm.astype("<i2").tobytes())
    return path


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """A 16-bit PCM WAV file → (wave (samples,) float32 = pcm / 32767 in [-1, 1], sample rate); channels averaged."""
    try:
        with open(path, "rb") as handle:
            return _decode_wav(handle)
    except (OSError, wavfile.Error, EOFError) as exc:
        raise DataError(f"{path}: not a readable WAV file ({exc})") from None


def _decode_wav(handle) -> tuple[torch.Tensor, int]:
    """Decode 16-bit PCM from a binary file object (a streamed header's frame count may be wrong)."""
    with wavfile.open(handle, "rb") as reader:
        if reader.getsampwidth() != 2:
            raise wavfile.Error(f"{8 * reader.getsampwidth()}-bit samples, expected 16-bit PCM")
        channels, rate = reader.getnchannels(), reader.getframerate()
        data = reader.readframes(reader.getnframes())
    pcm = np.frombuffer(data[: len(data) // (2 * channels) * 2 * channels], dtype="<i2")
    wave = torch.from_numpy(pcm.reshape(-1, channels).mean(1).astype(np.float32) / 32767.0)
    return wave.clamp(-1.0, 1.0), rate


def save_spectrograms(mels: torch.Tensor, path: str | Path, *, columns: int | None = None) -> Path:
    """A PNG grid of log-mel spectrograms (n, 1, n_mels, frames), low frequencies at the bottom."""
    mels = torch.as_tensor(mels, dtype=torch.float32)
    if mels.ndim != 4 or mels.shape[1] != 1:
        raise DataError(f"save_spectrograms: mels must be (n, 1, n_mels, frames), got shape {tuple(mels.shape)}")
    return save_grid(mels.flip(2), path, nrow=columns)
