"""The latent chain end to end through the command line (benchmarks/latent_chain.py --tiny): a streamed image
folder → small autoencoder → encode-latents → Self-Flow teacher on latents → unclipped pairs → reflow,
one-step distill and DMD students → samples decoded by the autoencoder the chain names → FD_dom."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_latent_chain_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(ROOT))
    from benchmarks.latent_chain import chain

    args = SimpleNamespace(data="digits", data_path=None, work=str(tmp_path / "chain"), device="cpu", count=200, image_size=8,
                           model_size=None, batch_size=64,
                           channels=1, autoencoder_downsample=2, ae_width=16, ae_steps=20, depth=2, width=64, teacher_steps=6,
                           teacher_sample_steps=2, pairs=64, student_steps=2, samples=64, feature_steps=5, workers=1)
    result = chain(args)
    assert result["pairs_clipped"] is False and result["latent_shape"] == [4, 4, 4]
    names = [row["generator"] for row in result["rows"]]
    assert names == ["teacher (self_flow)", "student (reflow)", "student (one-step distill)", "student (dmd)",
                     "autoencoder reconstructions (floor)"]
    assert all(np.isfinite(row["fd_dom"]) and row["fd_dom"] >= 0 for row in result["rows"])
    for run in ("teacher", "reflow", "one-step_distill", "dmd"):
        samples = tmp_path / "chain" / "samples" / run
        record = json.loads((samples / "samples.json").read_text())
        assert record["latent"] is True and record["autoencoder"] == str((tmp_path / "chain" / "autoencoder").resolve())
        with np.load(samples / "samples.npz") as pixels:  # decoded by the autoencoder the latent set names
            assert pixels["images"].shape == (64, 1, 8, 8) and pixels["images"].dtype == np.uint8
    assert [row["evaluations_per_image"] for row in result["rows"][1:4]] == [1, 1, 1]
