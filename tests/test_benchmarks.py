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


def test_modalities_cross_modal_table_gap_is_clean_minus_replace_per_seed():
    """The audio-video cross-modal table: clean − replace is taken per seed (same model, same given halves), then
    averaged; with vs without whole-part times names the better method, and one seed is never called a clear gap."""
    import modalities

    def stat(*values):
        return {"mean": sum(values) / len(values), "spread": (max(values) - min(values)) / 2,
                "seeds": {str(i): v for i, v in enumerate(values)}}

    summary = {"self_flow": {"audio_given_video_clean": stat(0.3, 0.1), "audio_given_video_replace": stat(0.1, 0.2)},
               "self_flow_whole_part": {"audio_given_video_clean": stat(0.5, 0.45), "audio_given_video_replace": stat(0.2, 0.2)}}
    lines = modalities.cross_modal(summary, {}, 256)
    row = next(line for line in lines if line.startswith("| self_flow |")).split(" | ")
    assert row[3] == "0.05 ± 0.15 [0.2, -0.1]"  # (0.3 − 0.1 + 0.1 − 0.2) / 2, half the range of 0.2 and −0.1
    verdict = next(line for line in lines if line.startswith("**With vs without"))
    assert "audio given video, clean: with whole-part times better" in verdict and "is larger than" in verdict
    one_seed = {m: {k: stat(v["seeds"]["0"]) for k, v in s.items()} for m, s in summary.items()}
    assert "one seed: no spread" in next(line for line in modalities.cross_modal(one_seed, {}, 256) if line.startswith("**With"))


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


# ---- benchmarks/one_step.py: each student against the teacher it learns --------------------------------
def test_one_step_rows_judge_each_student_against_the_teacher_it_learns():
    one_step = pytest.importorskip("one_step")

    def ev(run, steps, cfg, fd, acc=0.9, nfe=None):
        return {"run": run, "sampler": "euler", "steps": steps, "cfg_scale": cfg, "nfe_per_image": nfe or steps * (2 if cfg != 1 else 1),
                "fd_dom": fd, "class_accuracy": acc, "precision": 0.5, "recall": 0.5, "pixel_mean": 0.0, "pixel_std": 1.0}

    evals = [ev("teacher", 50, 1.0, 10.0, 0.8), ev("teacher", 1, 1.0, 40.0), ev("teacher", 50, 1.5, 5.2, 0.95), ev("teacher", 1, 1.5, 20.0),
             ev("reflow1", 1, 1.0, 11.0), ev("dmd_s0", 1, 1.0, 5.5), ev("dmd_s1", 1, 1.0, 6.5)]
    specs = [{"name": "reflow1", "method": "reflow", "group": "reflow1", "seed": 0, "learned_cfg": 1.0},
             {"name": "dmd_s0", "method": "DMD, 1 step", "group": "dmd", "seed": 0, "learned_cfg": 1.5},
             {"name": "dmd_s1", "method": "DMD, 1 step", "group": "dmd", "seed": 1, "learned_cfg": 1.5}]
    # images/s: the guided 50-step teacher costs twice the unguided one
    speed = {"results": {"euler50_cfg1": {"images_per_s_b256": 10.0, "ms_per_image_b1": 50.0},
                         "euler50_cfg1.5": {"images_per_s_b256": 5.0, "ms_per_image_b1": 100.0},
                         "euler1_cfg1": {"images_per_s_b256": 400.0, "ms_per_image_b1": 1.0},
                         "euler1_cfg1.5": {"images_per_s_b256": 200.0, "ms_per_image_b1": 2.0}}}
    rows = {r["group"]: r for r in one_step.build_rows(None, specs, evals, speed) if r["steps"] == 1}
    dmd, reflow = rows["dmd"], rows["reflow1"]
    assert dmd["fd_dom_values"] == [5.5, 6.5] and dmd["fd_dom"] == 6.0
    assert dmd["fd_dom_vs_learned_teacher"] == 6.0 / 5.2  # the guided teacher, not the unguided one (6.0 / 10.0)
    assert dmd["fd_dom_vs_learned_teacher_same_steps"] == 6.0 / 20.0 and dmd["learned_teacher_same_steps"]["nfe_per_image"] == 2
    assert dmd["speedup_b256_vs_teacher50"] == 400.0 / 5.0 and dmd["speedup_b1_vs_teacher50"] == 100.0
    assert reflow["fd_dom_vs_learned_teacher"] == 11.0 / 10.0 and reflow["speedup_b256_vs_teacher50"] == 400.0 / 10.0
    report = {"rows": one_step.build_rows(None, specs, evals, speed), "evaluation": {"floor_fd_dom": 0.5}}
    report["teacher"] = one_step.teacher_summary(report["rows"])
    assert (report["teacher"]["class_accuracy"], report["teacher"]["fd_dom"]) == (0.8, 10.0)
    assert report["teacher"]["by_guidance"]["1.5"]["class_accuracy"] == 0.95
    one_step.analyse(report)
    # reflow: 1.1× its teacher, 40× faster, but one seed; DMD: 1.15× its teacher, 80× faster, two seeds
    assert report["target"]["met"] == ["DMD, 1 step"]
    assert "Met by any: **yes**" in report["target"]["text"]
    # the closest model is a met one (reflow's 1.1× is closer but on one seed), and the text says what reflow misses
    assert (report["target"]["closest"], report["target"]["closest_misses"]) == ("DMD, 1 step", [])
    assert "**not met** (1 seed < 2; teacher's class accuracy 0.800 < 0.9)" in report["target"]["text"]
    report["rows"] = one_step.build_rows(None, specs, [{**e, "class_accuracy": 0.5} if e["run"] == "teacher" else e for e in evals], speed)
    one_step.analyse(report)  # the same students of a teacher that cannot draw (class accuracy 0.5): nothing is met
    assert report["target"]["met"] == [] and "teacher's class accuracy 0.500 < 0.9" in report["target"]["text"]
    assert report["target"]["closest"] == "reflow"  # nothing met: the fast row nearest its teacher, and why it misses
    assert report["target"]["closest_misses"] == ["1 seed < 2", "teacher's class accuracy 0.500 < 0.9"]


def test_one_step_target_misses_name_each_failed_condition():
    one_step = pytest.importorskip("one_step")
    row = {"speedup_b256_vs_teacher50": 30.0, "fd_dom_vs_learned_teacher": 1.2, "fd_dom_values": [1.0, 1.1],
           "learned_teacher": {"class_accuracy": 0.9}}
    assert one_step.target_misses(row) == []  # every bound is inclusive
    slow = {**row, "speedup_b256_vs_teacher50": 29.9, "fd_dom_vs_learned_teacher": 1.21}
    assert one_step.target_misses(slow) == ["speed-up 29.9× < 30×", "FD_dom 1.21× > 1.2× the teacher it learns"]


def test_one_step_report_names_paths_relative_to_the_checkout():
    one_step = pytest.importorskip("one_step")
    record = {"command": f"python -m selfflow train --set train.out_dir={one_step.ROOT}/runs/x --set data.path=/elsewhere/mnist", "seconds": 1.5}
    assert one_step.relative(record) == {"command": "python -m selfflow train --set train.out_dir=runs/x --set data.path=/elsewhere/mnist",
                                         "seconds": 1.5}


def _one_step_args(tmp_path, **changes):
    import argparse

    args = dict(pairs_cfg=1.0, guidance=1.5, seeds=[0, 1], loss_seeds=[], reflow_rounds=2, only=None, work=str(tmp_path), device="cpu",
                data="digits", teacher_run=None, report_only=False, teacher_steps=10, teacher_lr=1e-3, teacher_set=[], student_set=[],
                reflow_steps=5, distill_steps=5, dmd_steps=5, dmd2_steps=5, pairs=8, pairs_steps=2, regression_weight=0.25, threads=1,
                model="tiny")
    return argparse.Namespace(**{**args, **changes})


def test_one_step_specs_train_every_seed_of_every_group(tmp_path):
    one_step = pytest.importorskip("one_step")
    chain = one_step.Chain(_one_step_args(tmp_path, seeds=[0, 1, 2]))
    specs = chain.student_specs()
    groups = {}
    for s in specs:
        groups.setdefault(s["group"], []).append(s["seed"])
    assert set(groups) == {"reflow1", "reflow2", "distill1_l2", "distill2_l2", "distill4_l2", "dmd", "dmd_noreg", "dmd2", "dmd2_4step"}
    assert all(sorted(seeds) == [0, 1, 2] for seeds in groups.values()), groups
    assert len({s["name"] for s in specs}) == len(specs)
    # seed 0 keeps the names of the runs made before reflow had seeds (their finished stages are reused)
    assert [s["name"] for s in specs if s["group"] == "reflow1"] == ["reflow1", "reflow1_s1", "reflow1_s2"]
    assert [s["name"] for s in specs if s["group"] == "reflow2"] == ["reflow2", "reflow2_s1", "reflow2_s2"]


def test_one_step_reflow_round_two_of_a_seed_learns_that_seeds_round_one(tmp_path, monkeypatch):
    one_step = pytest.importorskip("one_step")
    chain = one_step.Chain(_one_step_args(tmp_path))
    commands = {}
    monkeypatch.setattr(one_step.Chain, "stage", lambda self, name, folder, argv: commands.setdefault(name, argv) and {})
    chain.run_all()

    def setting(name, key):
        argv = commands[name]
        return next(argv[i + 1].split("=", 1)[1] for i in range(len(argv) - 1) if argv[i] == "--set" and argv[i + 1].startswith(key + "="))

    runs, sets = chain.runs, chain.sets
    assert setting("reflow1_s1", "train.init_from") == str(runs / "teacher") and setting("reflow1_s1", "train.seed") == "1"
    assert setting("reflow1_s1", "data.path") == str(sets / "pairs_teacher")
    assert commands["pairs_reflow1_s1"][commands["pairs_reflow1_s1"].index("--ckpt") + 1] == str(runs / "reflow1_s1")
    assert setting("reflow2_s1", "train.init_from") == str(runs / "reflow1_s1") and setting("reflow2_s1", "train.seed") == "1"
    assert setting("reflow2_s1", "data.path") == str(sets / "pairs_reflow1_s1")
    assert setting("reflow2", "train.init_from") == str(runs / "reflow1") and setting("reflow2", "data.path") == str(sets / "pairs_reflow1")
    # the distilled students of every seed learn the first seed's 1-rectified flow and its pairs
    for seed in (0, 1):
        assert setting(f"distill1_l2_s{seed}", "train.init_from") == str(runs / "reflow1")
        assert setting(f"distill1_l2_s{seed}", "data.path") == str(sets / "pairs_reflow1")
        assert setting(f"distill1_l2_s{seed}", "train.seed") == str(seed)


def test_one_step_reflow_rows_carry_every_seed_into_the_verdict():
    one_step = pytest.importorskip("one_step")

    def ev(run, steps, cfg, fd, acc=0.95):
        return {"run": run, "sampler": "euler", "steps": steps, "cfg_scale": cfg, "nfe_per_image": steps, "fd_dom": fd,
                "class_accuracy": acc, "precision": 0.5, "recall": 0.5, "pixel_mean": 0.0, "pixel_std": 1.0}

    evals = [ev("teacher", 50, 1.0, 10.0), ev("teacher", 1, 1.0, 40.0), ev("reflow1", 1, 1.0, 11.0), ev("reflow1_s1", 1, 1.0, 12.0),
             ev("dmd_s0", 1, 1.0, 13.0), ev("dmd_s1", 1, 1.0, 13.0)]
    specs = [{"name": "reflow1", "method": "reflow", "group": "reflow1", "seed": 0, "learned_cfg": 1.0},
             {"name": "reflow1_s1", "method": "reflow", "group": "reflow1", "seed": 1, "learned_cfg": 1.0},
             {"name": "dmd_s0", "method": "DMD", "group": "dmd", "seed": 0, "learned_cfg": 1.0},
             {"name": "dmd_s1", "method": "DMD", "group": "dmd", "seed": 1, "learned_cfg": 1.0}]
    speed = {"results": {"euler50_cfg1": {"images_per_s_b256": 10.0, "ms_per_image_b1": 50.0},
                         "euler1_cfg1": {"images_per_s_b256": 400.0, "ms_per_image_b1": 1.0}}}
    report = {"rows": one_step.build_rows(None, specs, evals, speed), "evaluation": {"floor_fd_dom": 0.5}}
    reflow = next(r for r in report["rows"] if r["group"] == "reflow1")
    assert (reflow["fd_dom_values"], reflow["seeds"], reflow["fd_dom"]) == ([11.0, 12.0], [0, 1], 11.5)
    report["teacher"] = one_step.teacher_summary(report["rows"])
    one_step.analyse(report)
    assert report["target"]["met"] == ["reflow"]  # 1.15× its teacher on two seeds; DMD 1.3×
    assert report["target"]["closest"] == "reflow" and report["target"]["closest_misses"] == []
