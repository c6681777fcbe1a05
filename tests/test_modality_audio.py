"""Spoken digits: the mel filterbank, log-mel, Griffin-Lim, WAV files, synthesis and the digit classifier.

The data code always runs on the procedural stand-in; the espeak-ng path runs where espeak-ng is
installed (CI installs it when it can) and is skipped, saying so, elsewhere.
"""
from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch

from selfflow.errors import DataError
from selfflow.modalities import audio
from selfflow.modalities.evaluation.audio import audio_metrics, train_digit_classifier

SAMPLES = 12800  # 0.8 s at 16 kHz
NO_ESPEAK = "espeak-ng is not installed: the procedural stand-in is tested instead"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tone(freq: float, amplitude: float = 0.5, samples: int = SAMPLES) -> torch.Tensor:
    t = torch.arange(samples, dtype=torch.float64) / audio.SAMPLE_RATE
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()[None]


def mel_bin(freq: float, n_mels: int = 32) -> int:
    """The mel band containing ``freq``: the one whose triangle is largest there."""
    return int(audio.mel_triangles(torch.tensor([freq]), n_mels)[:, 0].argmax())


def dominant_frequency(wave_: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(wave_.double() * torch.hann_window(wave_.shape[-1], dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * audio.SAMPLE_RATE / wave_.shape[-1]


# --------------------------------------------------------------------------------------------
# mel filterbank and log-mel
# --------------------------------------------------------------------------------------------
def test_mel_scale_is_htk_and_invertible():
    assert float(audio.hz_to_mel(700.0)) == pytest.approx(2595 * math.log10(2))
    f = torch.linspace(0, 8000, 17, dtype=torch.float64)
    torch.testing.assert_close(audio.mel_to_hz(audio.hz_to_mel(f)), f)


def test_triangles_peak_at_one_at_their_centres_and_are_non_negative():
    edges = audio.mel_edges(32)
    at_centres = audio.mel_triangles(edges[1:-1], 32)
    torch.testing.assert_close(at_centres, torch.eye(32, dtype=torch.float64))
    bank = audio.mel_filterbank(32, 512)
    assert bank.shape == (32, 257) and bool((bank >= 0).all()) and float(bank.max()) <= 1.0
    # Between the first and the last centre the triangles are a partition of unity.
    inside = torch.linspace(float(edges[1]), float(edges[-2]), 101, dtype=torch.float64)
    torch.testing.assert_close(audio.mel_triangles(inside, 32).sum(0), torch.ones(101, dtype=torch.float64))


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_filterbank_of_a_tone_lights_up_its_band(freq):
    centre = float(audio.mel_edges(32)[mel_bin(freq) + 1])  # a tone on its band's centre
    power = torch.fft.rfft(tone(centre)[0, :512] * torch.hann_window(512)).abs().square()
    assert int((audio.mel_filterbank(32, 512) @ power).argmax()) == mel_bin(freq)


@pytest.mark.parametrize("freq", [250.0, 1200.0, 4000.0])
def test_log_mel_of_a_sine_peaks_in_the_band_containing_its_frequency(freq):
    mels = audio.log_mel(tone(freq))
    assert mels.shape == (1, 1, 32, 32) and mels.dtype == torch.float32
    assert float(mels.min()) >= -1 and float(mels.max()) <= 1
    rows = mels[0, 0].mean(1)
    assert int(rows.argmax()) == mel_bin(freq)


def test_log_mel_keeps_loudness():
    """The dB top is fixed: a tone 20 dB quieter sits 20 dB lower (0.5 in [-1, 1] units), not renormalised."""
    loud, quiet = audio.log_mel(tone(1000.0, 0.5)), audio.log_mel(tone(1000.0, 0.05))
    row = mel_bin(1000.0)
    drop_db = float((loud - quiet)[0, 0, row, 2:-2].mean()) * audio.DYNAMIC_RANGE_DB / 2
    assert drop_db == pytest.approx(20.0, abs=0.01)


def test_unit_range_mapping_round_trips():
    db = torch.linspace(-80.0, 0.0, 81)
    unit = audio.db_to_unit(db)
    assert float(unit[0]) == -1.0 and float(unit[-1]) == 1.0
    torch.testing.assert_close(audio.unit_to_db(unit), db)
    assert float(audio.db_to_unit(torch.tensor(-120.0))) == -1.0 and float(audio.db_to_unit(torch.tensor(5.0))) == 1.0


def test_hop_gives_exactly_the_frames_asked_for():
    for samples, frames in [(12800, 32), (12800, 16), (8000, 64), (16000, 32)]:
        hop = audio.hop_length(samples, frames)
        assert 1 + samples // hop == frames
        assert audio.log_mel(torch.zeros(1, samples), frames=frames).shape[-1] == frames


def window_weight(samples: int, frames: int, n_fft: int) -> torch.Tensor:
    """(samples,) Σ_t w(n − t·hop) over the frames, w the Hann window centred on its frame (center=True)."""
    hop, weight = audio.hop_length(samples, frames), torch.zeros(samples + n_fft, dtype=torch.float64)
    window = torch.hann_window(n_fft, dtype=torch.float64)
    for t in range(frames):
        weight[t * hop: t * hop + n_fft] += window  # index shifted by n_fft / 2 (the centring pad)
    return weight[n_fft // 2: n_fft // 2 + samples]


@pytest.mark.parametrize("frames", [8, 16, 32, 64])
def test_default_window_weights_every_sample(frames):
    """At the default window every sample has a Hann weight sum of at least one half; the old fixed
    512-sample window at 16 frames (hop 853) left samples with weight 0."""
    hop = audio.hop_length(SAMPLES, frames)
    n_fft = audio.window_length(hop)
    assert n_fft >= 2 * hop and float(window_weight(SAMPLES, frames, n_fft).min()) >= 0.5
    assert float(window_weight(SAMPLES, 16, 512).min()) == 0.0


def test_log_mel_refuses_a_window_shorter_than_two_hops():
    with pytest.raises(DataError, match="n_fft=512 leaves samples uncovered at hop=853") as info:
        audio.log_mel(torch.zeros(1, SAMPLES), n_mels=16, frames=16, n_fft=512)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="uncovered"):
        audio.mel_to_wave(torch.zeros(1, 1, 16, 16), samples=SAMPLES, n_fft=512)
    assert audio.log_mel(torch.zeros(1, SAMPLES), n_mels=16, frames=16, n_fft=1706).shape == (1, 1, 16, 16)


# --------------------------------------------------------------------------------------------
# against librosa (a dev dependency; skipped without it)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_mels, n_fft", [(16, 512), (32, 1024), (64, 2048)])
def test_filterbank_equals_librosa_htk_without_normalisation(n_mels, n_fft):
    librosa = pytest.importorskip("librosa")
    theirs = librosa.filters.mel(sr=audio.SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=audio.F_MAX,
                                 htk=True, norm=None, dtype=np.float64)
    torch.testing.assert_close(audio.mel_filterbank(n_mels, n_fft).double(), torch.from_numpy(theirs),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_mels, frames", [(16, 16), (32, 32)])
def test_log_mel_equals_librosa(n_mels, frames):
    """librosa's power mel spectrogram (same window, hop, reflect padding), scaled by (2 / Σ window)², in dB
    with ref 1 and amin 1e-10, then clamped and mapped as ours: equal on a chirp plus a digit."""
    librosa = pytest.importorskip("librosa")
    t = torch.arange(SAMPLES, dtype=torch.float64) / audio.SAMPLE_RATE
    chirp = 0.6 * torch.sin(2 * math.pi * (100 * t + 2000 * t ** 2))
    digit, _, _ = audio.synthesize_digits(1, seed=7, source="procedural", progress=False)
    waves = torch.stack([chirp.float(), digit[0]])
    hop = audio.hop_length(SAMPLES, frames)
    n_fft = audio.window_length(hop)
    theirs = librosa.feature.melspectrogram(y=waves.double().numpy(), sr=audio.SAMPLE_RATE, n_fft=n_fft,
                                            hop_length=hop, window="hann", center=True, pad_mode="reflect",
                                            power=2.0, n_mels=n_mels, fmin=0.0, fmax=audio.F_MAX, htk=True, norm=None)
    theirs = theirs * (2.0 / np.hanning(n_fft + 1)[:-1].sum()) ** 2
    db = librosa.power_to_db(theirs, ref=1.0, amin=audio.POWER_FLOOR, top_db=None)
    expected = audio.db_to_unit(torch.from_numpy(db))[:, None].float()
    ours = audio.log_mel(waves, n_mels=n_mels, frames=frames)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)


def test_fast_griffin_lim_matches_librosa_and_beats_plain():
    """Spectral convergence after 32 rounds: momentum 0.99 beats plain Griffin-Lim and is within 0.02 of
    librosa.griffinlim (same magnitude, its own random start)."""
    librosa = pytest.importorskip("librosa")
    waves, _, _ = audio.synthesize_digits(1, seed=2, source="procedural", progress=False)
    n_fft, hop = 512, 128
    target = audio._stft(waves, n_fft, hop).abs()
    sc = {}
    for name, momentum in (("plain", 0.0), ("fast", 0.99)):
        back = audio.griffin_lim(target, samples=SAMPLES, n_fft=n_fft, hop=hop, iterations=32, momentum=momentum)
        sc[name] = audio.spectral_convergence(target, back, n_fft=n_fft, hop=hop)
    scale = np.hanning(n_fft + 1)[:-1].sum() / 2.0
    theirs = librosa.griffinlim(target[0].double().numpy() * scale, n_iter=32, hop_length=hop, n_fft=n_fft,
                                window="hann", center=True, pad_mode="reflect", length=SAMPLES, momentum=0.99,
                                random_state=0)
    sc["librosa"] = audio.spectral_convergence(target, torch.from_numpy(theirs).float()[None], n_fft=n_fft, hop=hop)
    assert sc["fast"] < sc["plain"]
    assert sc["fast"] < sc["librosa"] + 0.02, sc


# --------------------------------------------------------------------------------------------
# Griffin-Lim
# --------------------------------------------------------------------------------------------
def test_griffin_lim_gives_back_the_tone_frequency():
    freq = 1000.0
    back = audio.mel_to_wave(audio.log_mel(tone(freq)), samples=SAMPLES, iterations=32)
    assert back.shape == (1, SAMPLES) and back.dtype == torch.float32 and float(back.abs().max()) <= 1
    spacing = float(audio.hz_to_mel(audio.F_MAX)) / 33
    assert abs(float(audio.hz_to_mel(dominant_frequency(back[0]))) - float(audio.hz_to_mel(freq))) <= spacing
    # Loudness is kept: the reconstruction's RMS is that of the tone (0.5 / √2) within 2 dB.
    rms = float(back[0, 1000:-1000].square().mean().sqrt())
    assert abs(20 * math.log10(rms / (0.5 / math.sqrt(2)))) < 2.0


def test_griffin_lim_spectral_convergence_improves_with_iterations():
    waves, _, _ = audio.synthesize_digits(1, source="procedural", progress=False)
    hop = 128
    target = audio._stft(waves, 512, hop).abs()
    errors = [audio.spectral_convergence(target, audio.griffin_lim(target, samples=SAMPLES, n_fft=512, hop=hop,
                                                                   iterations=k), n_fft=512, hop=hop)
              for k in (0, 4, 32)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]


def test_mel_to_wave_is_seeded():
    mels = audio.log_mel(tone(500.0))
    a, b = (audio.mel_to_wave(mels, samples=SAMPLES, iterations=2, seed=s) for s in (0, 0))
    assert torch.equal(a, b)
    assert not torch.equal(a, audio.mel_to_wave(mels, samples=SAMPLES, iterations=2, seed=1))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def test_wav_round_trip(tmp_path):
    x = tone(440.0, 0.8)[0]
    path = audio.write_wav(tmp_path / "a.wav", x)
    with wave.open(str(path), "rb") as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, audio.SAMPLE_RATE)
        assert reader.getnframes() == SAMPLES
    back, rate = audio.read_wav(path)
    assert rate == audio.SAMPLE_RATE
    assert float((back - x).abs().max()) <= 0.5 / 32767 + 1e-7  # rounding only
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_save_spectrograms_puts_low_frequencies_at_the_bottom(tmp_path):
    from PIL import Image
    import numpy as np

    mels = audio.log_mel(tone(100.0, 0.9))  # energy in the lowest bands only
    path = audio.save_spectrograms(torch.cat([mels, mels]), tmp_path / "s.png", columns=2)
    pixels = np.asarray(Image.open(path), dtype=np.float64)
    height = pixels.shape[0]
    assert pixels[height // 2:].mean() > pixels[: height // 2].mean() + 30


# --------------------------------------------------------------------------------------------
# synthesis
# --------------------------------------------------------------------------------------------
def _check_synthesis(source: str) -> None:
    waves, labels, used = audio.synthesize_digits(6, seed=3, source=source, progress=False)
    assert used == source
    assert waves.shape == (6, SAMPLES) and waves.dtype == torch.float32 and labels.dtype == torch.int64
    assert float(waves.abs().max()) <= 1 and bool((waves.abs().amax(1) >= audio.AMPLITUDE[0] - 1e-6).all())
    assert bool(((labels >= 0) & (labels < 10)).all())
    again, labels2, _ = audio.synthesize_digits(6, seed=3, source=source, progress=False)
    assert torch.equal(waves, again) and torch.equal(labels, labels2)
    longer, labels3, _ = audio.synthesize_digits(9, seed=3, source=source, progress=False)
    assert torch.equal(longer[:6], waves) and torch.equal(labels3[:6], labels)  # utterance i ignores n
    other, _, _ = audio.synthesize_digits(6, seed=4, source=source, progress=False)
    assert not torch.equal(other, waves)
    short, _, _ = audio.synthesize_digits(2, seed=3, source=source, duration=0.5, progress=False)
    assert short.shape == (2, 8000)


def test_procedural_synthesis_is_deterministic():
    _check_synthesis("procedural")


@pytest.mark.skipif(not audio.espeak_available(), reason=NO_ESPEAK)
def test_espeak_synthesis_is_deterministic_and_cached(tmp_path):
    _check_synthesis("espeak")
    waves, labels, _ = audio.synthesize_digits(4, seed=5, source="espeak", cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("spoken_digits_*.safetensors"))) == 1
    again, labels2, _ = audio.synthesize_digits(4, seed=5, source="espeak", cache_dir=tmp_path, progress=False)
    assert torch.equal(waves, again) and torch.equal(labels, labels2)
    # The word starts within the 0.1 s offset.
    start = int((waves.abs() > 1e-3).float().argmax(1).max())
    assert start <= audio.MAX_OFFSET * audio.SAMPLE_RATE + 1


def test_auto_source_falls_back_to_the_procedural_stand_in(monkeypatch, caplog):
    monkeypatch.setattr(audio, "espeak_available", lambda: False)
    with caplog.at_level("INFO", logger=audio.__name__):
        _, _, used = audio.synthesize_digits(2, progress=False)
    assert used == "procedural" and "procedural stand-in" in caplog.text
    with pytest.raises(DataError, match="apt-get install espeak-ng"):
        audio.synthesize_digits(2, source="espeak", progress=False)


@pytest.mark.parametrize("call, name", [
    (lambda: audio.synthesize_digits(0, progress=False), "n"),
    (lambda: audio.synthesize_digits(2, duration=-1.0, progress=False), "duration"),
    (lambda: audio.synthesize_digits(2, source="mbrola", progress=False), "source"),
    (lambda: audio.log_mel(torch.zeros(1, SAMPLES), n_mels=1), "n_mels"),
    (lambda: audio.log_mel(torch.zeros(1, SAMPLES), n_fft=63), "n_fft"),
    (lambda: audio.log_mel(torch.zeros(1, 100), frames=32), "frames"),
    (lambda: audio.log_mel(torch.zeros(SAMPLES)), "waves"),
    (lambda: audio.mel_to_wave(torch.zeros(1, 1, 32, 32), samples=SAMPLES, iterations=-1), "iterations"),
])
def test_bad_arguments_raise_data_error_naming_them(call, name):
    with pytest.raises(DataError, match=name) as info:
        call()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def test_digit_classifier_learns_procedural_digits(tmp_path):
    waves, labels, _ = audio.synthesize_digits(500, seed=1, source="procedural", progress=False)
    mels = audio.log_mel(waves, n_mels=16, frames=16)
    train, test = slice(0, 400), slice(400, 500)
    net = train_digit_classifier(mels[train], labels[train], tmp_path / "clf", steps=250, widths=(16, 32, 32),
                                 batch_size=64, progress=False)
    assert (tmp_path / "clf" / "model.safetensors").is_file()
    good = audio_metrics(net, mels[test], labels[test], mels[train])
    assert good["n"] == 100 and good["accuracy"] > 0.5  # chance is 0.1
    wrong = audio_metrics(net, mels[test], (labels[test] + 1) % 10, mels[train])
    assert wrong["accuracy"] < 0.3
    noise = audio_metrics(net, torch.rand_like(mels[test]) * 2 - 1, labels[test], mels[train])
    assert noise["fd"] > 2 * good["fd"]
