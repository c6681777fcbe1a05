"""Benchmark plumbing that a lent GPU session relies on and cannot afford to debug there.

benchmarks/convergence.py --interleave trains the methods in turns so that a time limit stops all
of them at the same step; the GPU suite's convergence figure is only a comparison if that holds.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
convergence = pytest.importorskip("convergence")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        return self.now


def fake_run(clock: FakeClock, name: str, seconds_per_interval: float, intervals: int, log: dict):
    """Stands in for run_one: each interval costs time, then yields; stops when sent True."""
    step = 0
    while step < intervals:
        clock.now += seconds_per_interval
        step += 1
        log[name] = step
        stop = yield
        if stop and step < intervals:
            log[name + " stopped"] = step
            return


def test_runs_in_turns_stop_at_the_same_step_before_the_deadline(monkeypatch):
    clock, log = FakeClock(), {}
    monkeypatch.setattr(convergence.time, "time", clock.time)
    # three methods of unequal cost: one round is 1 + 1.5 + 2 = 4.5 s; the deadline at 10 s leaves room for two
    runs = [fake_run(clock, "fm", 1.0, 100, log), fake_run(clock, "dual", 1.5, 100, log), fake_run(clock, "sf", 2.0, 100, log)]
    convergence.train_in_turns(runs, deadline=10.0)
    assert log == {"fm": 2, "dual": 2, "sf": 2, "fm stopped": 2, "dual stopped": 2, "sf stopped": 2}
    assert clock.now <= 10.0


def test_runs_in_turns_finish_when_time_allows(monkeypatch):
    clock, log = FakeClock(), {}
    monkeypatch.setattr(convergence.time, "time", clock.time)
    runs = [fake_run(clock, "fm", 1.0, 3, log), fake_run(clock, "sf", 1.0, 3, log), fake_run(clock, "done", 1.0, 0, log)]
    convergence.train_in_turns(runs, deadline=float("inf"))
    assert log == {"fm": 3, "sf": 3}


def test_report_says_where_a_time_limit_stopped_the_runs():
    assert convergence.steps_text({"steps": 1500, "steps_reached": 1500}) == "1500 steps"
    assert convergence.steps_text({"steps": 1500, "steps_reached": 1000}).startswith("1000 of 1500 planned steps")


def test_modalities_benchmark_smoke_writes_every_kind_and_links_media_that_exist(tmp_path):
    """benchmarks/modalities.py --smoke (the GPU suite's last step, tiny sizes): every kind, every method, two seeds,
    resumable (a second call trains nothing), --report-only rebuilds the same numbers."""
    import json
    import os
    import re
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "modalities.py"
    out, work = tmp_path / "docs" / "modalities_smoke", tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFFLOW_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(script), "--smoke", "--device", "cpu", "--out", str(out), "--work", str(work)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    record = json.loads(out.with_suffix(".json").read_text())
    assert list(record["kinds"]) == ["video", "audio", "audio_video", "actions"]
    for kind, info in record["kinds"].items():
        methods = ({"flow_matching", "self_flow"} | ({"regression"} if kind == "actions" else set())
                   | ({"self_flow_whole_part"} if kind == "audio_video" else set()))
        assert set(info["summary"]) == methods
        assert {(r["method"], r["seed"]) for r in info["rows"]} == {(m, s) for m in methods for s in (0, 1)}
        for stats in info["summary"].values():  # the mean lies between the two seeds' values, the spread is half their range
            for s in stats.values():
                lo, hi = min(s["seeds"].values()), max(s["seeds"].values())
                assert lo - 1e-9 <= s["mean"] <= hi + 1e-9 and abs(s["spread"] - (hi - lo) / 2) < 1e-9
    av = record["kinds"]["audio_video"]["rows"][0]["eval"]
    assert av["clean"]["given_mode"] == "clean" and av["replace"]["given_mode"] == "replace"
    assert 0 <= av["clean"]["sync_offset"] <= 0.8 and "audio_given_video_sync_offset" in av["clean"]
    assert "fd_clips" in record["kinds"]["video"]["rows"][0]["eval"]["clean"]["video"]
    text = out.with_suffix(".md").read_text()
    links = re.findall(r"\]\((modalities_smoke/[^)]+)\)", text)
    assert links and all((out.parent / link).is_file() for link in links)
    assert any(link.endswith(".wav") for link in links) and any(link.endswith(".gif") for link in links)
    stamp = (work / "video" / "self_flow_seed0" / "train_seconds.json").stat().st_mtime
    subprocess.run(cmd + ["--report-only"], check=True, env=env, capture_output=True, timeout=120)
    assert (work / "video" / "self_flow_seed0" / "train_seconds.json").stat().st_mtime == stamp
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["kinds"]["audio"]["summary"] == record["kinds"]["audio"]["summary"]


def test_text_to_image_defaults_keep_the_cpu_configs_and_size_s_resolves():
    """benchmarks/text_to_image.py: the defaults (CPU, fp32, tiny DiT, batch 64) give exactly RUN, so a CPU --work
    folder is reused; --model-size S is the DiT size S; --device cuda without CUDA is a one-line error."""
    import argparse
    import subprocess

    import torch

    t2i = pytest.importorskip("text_to_image")
    args = argparse.Namespace(device_name="cpu", precision="fp32", batch_size=64, model_size="tiny", data="digits",
                              data_path=None, patch=2, steps=4, encoder="hashed", captions_per_image=4, work=Path("w"))
    assert t2i.base_raw(args) == t2i.RUN
    args.device_name, args.precision, args.batch_size, args.model_size = "cuda", "auto", 256, "S"
    config = t2i.run_config(args, "self_flow", 0)
    assert config.model.resolved_dims() == (12, 384, 6) and config.model.patch_size == 2
    assert (config.train.device, config.train.precision, config.train.batch_size, config.train.lr) == ("cuda", "auto", 256, 2e-4)
    if not torch.cuda.is_available():
        script = Path(__file__).resolve().parent.parent / "benchmarks" / "text_to_image.py"
        done = subprocess.run([sys.executable, str(script), "--device", "cuda", "--work", "/nonexistent/t2i"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [
            "text_to_image.py: --device='cuda' but CUDA is not available on this machine"]
