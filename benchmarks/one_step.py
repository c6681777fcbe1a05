"""One-step generation: the teacher at 50/20/10/4/1 steps against reflowed, distilled, DMD and DMD2 students.

The whole chain runs through the command line (``python -m selfflow ...`` in a subprocess, so every
stage is a command anyone can rerun) and is resumable: a stage whose run folder holds its
``stage.json`` is skipped, an evaluation whose record exists is not redone.

1. teacher: ``selfflow train`` (Self-Flow config of the data set);
   (or ``--teacher-run``: an existing run, e.g. of ``configs/mnist_teacher_cpu.yaml``);
2. teacher pairs: ``selfflow generate-set --kind pairs --sampler heun --steps 32`` (guidance ``--pairs-cfg``, 1),
   and for DMD's regression the same at the real score's guidance ``--guidance`` (1.5);
3. reflow round 1 (``selfflow distill reflow``, from the teacher, on its pairs), its pairs, and
   (``--reflow-rounds 2``) round 2 from round 1's pairs, for every ``--seeds`` (round 2 of a seed learns
   round 1 of that seed) — straightness is measured for the first seed's;
4. students from the first seed's 1-rectified flow and its pairs (InstaFlow): ``selfflow distill one-step`` with
   1, 2 and 4 Euler steps (loss l2, every ``--seeds``) and the 1-step student with pseudo-Huber and
   feature losses (``--loss-seeds``);
5. ``selfflow distill dmd`` (with its regression on the guided pairs: "DMD"; without: "DMD (no
   regression)") and ``selfflow distill dmd2`` (1 step, and 4 steps with backward simulation) from the
   teacher, real score at guidance ``--guidance``, every ``--seeds``.

Every student is judged against the teacher it learns — the teacher at the guidance its target was
made with — at 50 Euler steps (``fd_dom_vs_learned_teacher``; speed-up against that teacher's 50-step
cost, a guided step costing two evaluations) and at the student's own number of steps.

Every model is then scored on the same noise (image k from seed k, label k mod classes):

* **FD_dom**: Fréchet distance in the 128-d features of the project's FD_dom classifier of the data
  set (``selfflow.evaluation.feature_net_for``: trained once, cached in ``<work>/cache``) against
  the whole training split; class accuracy of the samples under the same classifier; k-NN
  precision/recall (k = 3) in the same features against the training split;
* **speed**: images/s at batch 256 and latency per image at batch 1 of ``selfflow.sampling.generate``
  after a warm-up, on the same device, every (sampler, steps, guidance) timed in turns over several
  rounds (median). All students have the teacher's architecture, so a sampler setting costs the
  same for every model: it is timed once, on the teacher;
* network evaluations per image (a guided step counts 2);
* straightness ``selfflow.methods.one_step.straightness`` of teacher and reflowed models on the same
  noise (Euler, 32 steps, guidance 1).

The feature loss of distillation uses a second classifier trained with another seed (the FD_dom
network itself would be optimised against its own metric).

    # CPU, 8×8 digits (docs/benchmarks/one_step_digits_cpu.*)
    python benchmarks/one_step.py --data digits --work runs/one_step_digits --out docs/benchmarks/one_step_digits_cpu
    # rebuild the report from the records
    python benchmarks/one_step.py --data digits --work runs/one_step_digits --out docs/benchmarks/one_step_digits_cpu --report-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from harness import machine, resolve_data_path

ROOT = Path(__file__).resolve().parents[1]

MODEL_PRESETS = {
    # the digits configs' model: 16 tokens
    "tiny": ["model.size=tiny", "model.depth=4", "model.hidden_size=64", "model.num_heads=4", "model.patch_size=2"],
    # MNIST on a CPU: a tiny DiT with patch 4 (49 tokens), as docs/benchmarks/convergence_mnist_cpu_p4.md
    "tiny_p4": ["model.size=tiny", "model.depth=4", "model.hidden_size=64", "model.num_heads=4", "model.patch_size=4"],
    # MNIST on a CPU, the teacher of configs/mnist_teacher_cpu.yaml (--teacher-run): depth 5, width 96, patch 4
    "cpu_teacher": ["model.size=tiny", "model.depth=5", "model.hidden_size=96", "model.num_heads=4", "model.patch_size=4"],
    # MNIST on a GPU: DiT-S/2 (196 tokens)
    "S": ["model.size=S", "model.depth=null", "model.hidden_size=null", "model.num_heads=null", "model.patch_size=2"],
}
DEFAULTS = {
    "digits": dict(model="tiny", teacher_steps=2000, teacher_lr=2e-3, pairs=10000, reflow_steps=2000, distill_steps=1000,
                   dmd_steps=1000, dmd2_steps=2500, num_samples=1000, fd_steps=2000),
    "mnist": dict(model="tiny_p4", teacher_steps=6000, teacher_lr=1e-3, pairs=10000, reflow_steps=2000, distill_steps=1000,
                  dmd_steps=1000, dmd2_steps=2500, num_samples=2000, fd_steps=3000),
}
TEACHER_EULER = [50, 20, 10, 4, 2, 1]
TEACHER_HEUN = [25, 10, 5, 2]


def reflow_name(round_: int, seed: int) -> str:
    """The run of reflow round 1 or 2 with a seed: ``reflow1`` / ``reflow2`` for seed 0, ``reflow1_s1`` … for the others."""
    return f"reflow{round_}" if seed == 0 else f"reflow{round_}_s{seed}"


def reflow_pairs_name(seed: int) -> str:
    """The pair set of the 1-rectified flow of a seed (round 2 of that seed learns it)."""
    return "pairs_reflow1" if seed == 0 else f"pairs_reflow1_s{seed}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# the chain: stages are CLI commands, skipped when done
# --------------------------------------------------------------------------------------------
class Chain:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.runs = self.work / "runs"
        self.sets = self.work / "sets"
        self.cuda = args.device.startswith("cuda")
        self.data_path = resolve_data_path(args) if args.data == "mnist" else None

    def folder(self, name: str) -> Path:
        """A run's folder: <work>/runs/<name>, or ``--teacher-run`` for the teacher."""
        if name == "teacher" and self.args.teacher_run:
            return Path(self.args.teacher_run).resolve()
        return self.runs / name

    def done(self, name: str) -> bool:
        if name == "teacher" and self.args.teacher_run:  # a run folder or one of its checkpoints
            return self.folder(name).is_dir()
        return (self.runs / name / "stage.json").is_file()

    # ---- common overrides -----------------------------------------------------------------
    def common(self, out_dir: Path, seed: int) -> list[str]:
        return [f"train.out_dir={out_dir}", f"train.seed={seed}", f"train.device={self.args.device}",
                f"train.precision={'bf16' if self.cuda else 'fp32'}", "train.progress=false", "train.tensorboard=false",
                "train.num_sample_images=0", "train.ckpt_every=0", "train.sample_every=0", "train.log_every=100",
                *MODEL_PRESETS[self.args.model]]

    def data_overrides(self) -> list[str]:
        """For the configs whose data are real images (teacher, DMD, DMD2)."""
        if self.args.data == "mnist":
            return ["data.name=mnist", f"data.path={self.data_path}"]
        return ["data.name=digits"]

    def config(self, name: str) -> str:
        """configs/<data>_<name>.yaml, else the digits one (the one-step configs exist for the digits)."""
        own = ROOT / "configs" / f"{self.args.data}_{name}.yaml"
        return str(own if own.is_file() else ROOT / "configs" / f"digits_{name}.yaml")

    # ---- running a command once -----------------------------------------------------------
    def stage(self, name: str, folder: Path, argv: list[str]) -> dict:
        marker = folder / "stage.json"
        if marker.is_file():
            return json.loads(marker.read_text())
        if self.args.report_only:
            return {}
        command = [sys.executable, "-m", "selfflow", *argv]
        log(f"{name}: {' '.join(shlex.quote(a) for a in command[1:])}")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads))
        start = time.time()
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.time() - start
        if result.returncode != 0:
            print(result.stdout[-4000:])
            raise SystemExit(f"{name} failed (exit {result.returncode}): {' '.join(command)}")
        record = {"stage": name, "command": "python " + " ".join(shlex.quote(a) for a in command[1:]), "seconds": round(seconds, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": self.args.threads}
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=2))
        log(f"{name}: done in {seconds:.0f} s")
        return record

    def train(self, name: str, kind: str | None, config: str, overrides: list[str], seed: int = 0) -> dict:
        out = self.runs / name
        argv = ["train" if kind is None else "distill", *([] if kind is None else [kind]), "--config", config]
        for item in [*overrides, *self.common(out, seed)]:
            argv += ["--set", item]
        return self.stage(name, out, argv)

    def pairs(self, name: str, ckpt: Path, cfg: float = 1.0) -> dict:
        out = self.sets / name
        argv = ["generate-set", "--ckpt", str(ckpt), "--out", str(out), "--kind", "pairs", "--n", str(self.args.pairs),
                "--sampler", "heun", "--steps", str(self.args.pairs_steps), "--cfg-scale", f"{cfg:g}", "--device", self.args.device,
                "--batch-size", "1000", "--shard-size", str(min(self.args.pairs, 5000))]
        return self.stage(name, out, argv)

    # ---- the runs ---------------------------------------------------------------------------
    def student_specs(self) -> list[dict]:
        """Every trained model after the teacher: name, what it is, how it samples."""
        a = self.args
        pc, g = a.pairs_cfg, a.guidance  # the guidance each student learns: reflow's pairs', DMD's real score's
        specs = []
        for seed in a.seeds:  # every reflow round for every seed: round 2 of seed s learns pairs of round 1 of seed s
            specs.append({"name": reflow_name(1, seed), "method": "1-rectified flow (reflow), no distillation", "group": "reflow1",
                          "seed": seed, "steps": [1, 2, 4], "learned_cfg": pc})
            if a.reflow_rounds >= 2:
                specs.append({"name": reflow_name(2, seed), "method": "2-rectified flow (reflow twice), no distillation", "group": "reflow2",
                              "seed": seed, "steps": [1, 2, 4], "learned_cfg": pc})
        for k in (1, 2, 4):
            for seed in a.seeds:
                specs.append({"name": f"distill{k}_l2_s{seed}", "method": f"reflow + distill, {k} step{'s' if k > 1 else ''} (l2)",
                              "group": f"distill{k}_l2", "seed": seed, "steps": [k], "k": k, "loss": "l2", "learned_cfg": pc})
        for loss in ("pseudo_huber", "feature"):
            for seed in a.loss_seeds:
                specs.append({"name": f"distill1_{loss}_s{seed}", "method": f"reflow + distill, 1 step ({loss})",
                              "group": f"distill1_{loss}", "seed": seed, "steps": [1], "k": 1, "loss": loss, "learned_cfg": pc})
        for seed in a.seeds:
            specs.append({"name": f"dmd_s{seed}", "method": "DMD, 1 step", "group": "dmd", "seed": seed, "steps": [1], "learned_cfg": g})
            specs.append({"name": f"dmd_noreg_s{seed}", "method": "DMD (no regression), 1 step", "group": "dmd_noreg", "seed": seed,
                          "steps": [1], "learned_cfg": g})
            specs.append({"name": f"dmd2_s{seed}", "method": "DMD2, 1 step", "group": "dmd2", "seed": seed, "steps": [1], "learned_cfg": g})
            specs.append({"name": f"dmd2_4step_s{seed}", "method": "DMD2, 4 steps (backward simulation)", "group": "dmd2_4step",
                          "seed": seed, "steps": [4], "learned_cfg": g})
        if not a.only:
            return specs
        chosen = [s for s in specs if s["name"] in a.only or s["group"] in a.only]
        if any(s["name"].startswith("distill") for s in chosen):  # the students of reflow need the first seed's 1-rectified flow
            chosen = [s for s in specs if s["name"] == reflow_name(1, a.seeds[0]) and s not in chosen] + chosen
        return chosen

    def run_all(self) -> dict:
        a = self.args
        records = {}
        teacher = self.folder("teacher")
        if a.teacher_run:  # a teacher trained by its own command (configs/mnist_teacher_cpu.yaml): recorded, not rerun
            records["teacher"] = {"stage": "teacher", "command": f"(an existing run: {teacher}; its config.yaml holds the recipe)",
                                  "seconds": 0.0}
        else:
            records["teacher"] = self.train("teacher", None, self.config("self_flow"), [
                f"train.steps={a.teacher_steps}", f"train.lr={a.teacher_lr}", "train.batch_size=64", "train.warmup_steps=200",
                "train.ema_decay=0.999", *self.data_overrides(), *a.teacher_set])
        chosen = self.student_specs()
        reflow = any(s["name"].startswith(("reflow", "distill")) for s in chosen)
        if reflow:
            records["pairs_teacher"] = self.pairs("pairs_teacher", teacher, a.pairs_cfg)
        if any(s["group"] == "dmd" for s in chosen):  # DMD's regression: pairs of the real score (the teacher at a.guidance)
            records["pairs_teacher_guided"] = self.pairs("pairs_teacher_guided", teacher, a.guidance)
        reflow_seeds = sorted({s["seed"] for s in chosen if s["group"].startswith("reflow")})
        for seed in reflow_seeds:  # round 1 from the teacher on its pairs, round 2 from round 1 on round 1's pairs (same seed)
            previous, previous_pairs = teacher, self.sets / "pairs_teacher"
            for round_ in range(1, a.reflow_rounds + 1):
                name = reflow_name(round_, seed)
                records[name] = self.train(name, "reflow", self.config("reflow"), [
                    f"train.init_from={previous}", f"data.path={previous_pairs}", f"train.steps={a.reflow_steps}", *a.student_set], seed)
                if round_ == 1:
                    pairs = reflow_pairs_name(seed)
                    records[pairs] = self.pairs(pairs, self.runs / name)
                    previous_pairs = self.sets / pairs
                previous = self.runs / name
        fnet = self.loss_feature_net() if not a.report_only and any(s.get("loss") == "feature" for s in chosen) else None
        for spec in chosen:
            name = spec["name"]
            if name.startswith("reflow"):
                continue
            if name.startswith("distill"):
                # distilled from the first seed's 1-rectified flow on its own pairs (every distill seed alike)
                overrides = [f"train.init_from={self.runs / reflow_name(1, a.seeds[0])}", f"data.path={self.sets / reflow_pairs_name(a.seeds[0])}",
                             f"train.steps={a.distill_steps}", f"method.steps={spec['k']}", f"method.loss={spec['loss']}"]
                if spec["loss"] == "feature":
                    overrides.append(f"method.feature_net={fnet or self.work / 'loss_feature_net'}")
                records[name] = self.train(name, "one-step", self.config("distill"), overrides + a.student_set, spec["seed"])
            else:
                kind = "dmd" if name.startswith("dmd_") else "dmd2"
                data = ([f"data.path={self.sets / 'pairs_teacher_guided'}", "data.name=pairs", f"method.regression_weight={a.regression_weight}"]
                        if spec["group"] == "dmd" else [*self.data_overrides(), "method.regression_weight=0"] if kind == "dmd"
                        else self.data_overrides())
                overrides = [f"method.teacher={teacher}", f"train.init_from={teacher}", f"method.real_cfg={a.guidance}", *data,
                             f"train.steps={a.dmd_steps if kind == 'dmd' else a.dmd2_steps}"]
                if "4step" in name:
                    overrides += ["method.generator_steps=4", "method.backward_simulation=true", "sample.steps=4"]
                records[name] = self.train(name, kind, self.config(kind), overrides + a.student_set, spec["seed"])
        return records

    def loss_feature_net(self) -> str:
        """The feature loss's network: the FD_dom architecture, another seed (7), cached in <work>."""
        from selfflow.evaluation.feature_net import feature_net_for

        _net, folder = feature_net_for(self.args.data, self.data_path, "cpu", self.work / "cache", steps=self.args.fd_steps,
                                       seed=7, progress=False)
        return str(folder)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, chain: Chain):
        from selfflow.data import load_dataset
        from selfflow.evaluation import compute_stats, extract_features
        from selfflow.evaluation.feature_net import conditional_accuracy, feature_net_for

        self.chain, self.args = chain, chain.args
        self.device = torch.device(self.args.device)
        self.net, self.net_folder = feature_net_for(self.args.data, chain.data_path, self.device, chain.work / "cache",
                                                    steps=self.args.fd_steps, progress=False)
        train = load_dataset(self.args.data, path=chain.data_path, split="train")
        test = load_dataset(self.args.data, path=chain.data_path, split="test")
        x_train, _ = train.get_batch(torch.arange(len(train)))
        x_test, y_test = test.get_batch(torch.arange(len(test)))
        self.real_features = extract_features(self.net, x_train.to(self.device), batch_size=1000).float().cpu()
        self.real_radii = None  # the k-NN radii of the real features: one N² pass for every evaluation
        self.reference = compute_stats(self.net, x_train.to(self.device), batch_size=1000)
        floor_count = min(len(test), self.args.num_samples)
        floor = compute_stats(self.net, x_test[:floor_count].to(self.device), batch_size=1000).frechet_distance(self.reference)
        test_accuracy, _ = conditional_accuracy(self.net, x_test, y_test)
        self.info = {"fd_net": str(self.net_folder), "fd_net_sha256": self.net.weights_sha256(), "fd_net_test_accuracy": test_accuracy,
                     "reference": f"{self.args.data} train split ({len(train)} images)", "floor_fd_dom": floor,
                     "floor_count": floor_count, "real_mean": float(x_train.mean()), "real_std": float(x_train.std()),
                     "num_samples": self.args.num_samples, "sample_seeds": f"0..{self.args.num_samples - 1}",
                     "labels": "seed mod classes", "precision_recall_k": 3}
        self.models: dict[str, object] = {}

    def model(self, name: str):
        from selfflow.model import load_generator

        if name not in self.models:
            self.models[name] = load_generator(self.chain.folder(name), "ema", self.device)[0].eval()
        return self.models[name]

    def images(self, name: str, sampler: str, steps: int, cfg: float, n: int):
        from selfflow.sampling import generate

        model = self.model(name)
        return generate(model, num_samples=n, seeds=list(range(n)), sampler=sampler, steps=steps, cfg_scale=cfg,
                        batch_size=1000, device=self.device, image_shape=(model.in_channels, model.image_size, model.image_size),
                        autocast_dtype=torch.bfloat16 if self.device.type == "cuda" else None, progress=False)

    def score(self, name: str, sampler: str, steps: int, cfg: float) -> dict:
        from selfflow.evaluation import FeatureStats, extract_features, precision_recall
        from selfflow.evaluation.precision_recall import knn_radii
        from selfflow.evaluation.feature_net import conditional_accuracy

        path = self.chain.work / "evals" / f"{name}__{sampler}{steps}_cfg{cfg:g}_n{self.args.num_samples}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = self.images(name, sampler, steps, cfg, self.args.num_samples)
        features = extract_features(self.net, result.images.to(self.device), batch_size=1000).float().cpu()
        fd = FeatureStats.from_features(features).frechet_distance(self.reference)
        accuracy, _ = conditional_accuracy(self.net, result.images, result.labels)
        if self.real_radii is None:
            self.real_radii = knn_radii(self.real_features, 3)
        pr = precision_recall(self.real_features, features, k=3, real_radii=self.real_radii)
        row = {"run": name, "sampler": sampler, "steps": steps, "cfg_scale": cfg, "nfe_per_image": result.nfe_per_sample,
               "fd_dom": fd, "class_accuracy": accuracy, "precision": pr.precision, "recall": pr.recall,
               "pixel_mean": float(result.images.mean()), "pixel_std": float(result.images.std()),
               "n": self.args.num_samples, "sampling_s": result.wall_time_s}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2))
        log(f"{name} {sampler} {steps} cfg {cfg:g}: FD_dom {fd:.3f} acc {accuracy:.3f} P {pr.precision:.3f} R {pr.recall:.3f}")
        return row

    # ---- speed --------------------------------------------------------------------------------
    def speed(self, settings: list[tuple[str, int, float]]) -> dict:
        """images/s at batch 256 and ms per image at batch 1, every setting timed once per round, in turns."""
        from selfflow.sampling import generate

        path = self.chain.work / f"speed_{self.args.device.replace(':', '')}.json"
        key = sorted(f"{s}{k}_cfg{c:g}" for s, k, c in settings)
        if path.is_file():
            record = json.loads(path.read_text())
            if sorted(record["settings"]) == key or self.args.report_only:
                return record
        torch.set_num_threads(self.args.threads)
        model = self.model("teacher")
        shape = (model.in_channels, model.image_size, model.image_size)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        autocast = torch.bfloat16 if self.device.type == "cuda" else None

        def once(setting, batch):
            sampler, steps, cfg = setting
            generate(model, num_samples=batch, seeds=list(range(batch)), sampler=sampler, steps=steps, cfg_scale=cfg,
                     batch_size=batch, device=self.device, image_shape=shape, autocast_dtype=autocast, progress=False)

        def per_call(setting, batch, min_seconds):
            calls, start = 0, time.perf_counter()
            while True:
                once(setting, batch)
                calls += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    return elapsed / calls

        samples: dict[str, dict[str, list[float]]] = {}
        for setting in settings:  # warm-up
            once(setting, 1)
            once(setting, 256)
        for round_ in range(self.args.speed_rounds):
            for setting in settings:
                name = f"{setting[0]}{setting[1]}_cfg{setting[2]:g}"
                entry = samples.setdefault(name, {"b256": [], "b1": []})
                entry["b256"].append(per_call(setting, 256, 0.3))
                entry["b1"].append(per_call(setting, 1, 0.3))
        record = {"settings": key, "device": self.args.device, "threads": self.args.threads, "rounds": self.args.speed_rounds,
                  "machine": machine(self.device), "timed_model": "teacher (every student has its architecture)", "results": {}}
        for name, entry in samples.items():
            b256, b1 = statistics.median(entry["b256"]), statistics.median(entry["b1"])
            record["results"][name] = {"images_per_s_b256": 256 / b256, "ms_per_image_b256": 1e3 * b256 / 256,
                                       "ms_per_image_b1": 1e3 * b1, "b256_s_all_rounds": entry["b256"], "b1_s_all_rounds": entry["b1"]}
        path.write_text(json.dumps(record, indent=2))
        log("speed measured")
        return record

    # ---- straightness -------------------------------------------------------------------------
    def straightness(self, names: list[str]) -> dict:
        from selfflow.methods.one_step import straightness
        from selfflow.sampling import noise_for_seeds

        path = self.chain.work / "straightness.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        n, steps = min(self.args.num_samples, 1000), 32
        for name in names:
            if name in record or not self.chain.done(name):
                continue
            model = self.model(name)
            noise = noise_for_seeds(range(n), (model.in_channels, model.image_size, model.image_size), self.device)
            labels = torch.arange(n, device=self.device) % model.num_classes if model.num_classes else None
            record[name] = {"straightness": straightness(model, noise, labels, steps=steps), "n": n, "steps": steps,
                            "sampler": "euler", "cfg_scale": 1.0, "noise": f"seeds 0..{n - 1}"}
            log(f"straightness {name}: {record[name]['straightness']:.4f}")
        path.write_text(json.dumps(record, indent=2))
        return record

    # ---- pictures -------------------------------------------------------------------------------
    def grids(self, entries: list[tuple[str, str, str, int, float]], out: Path) -> None:
        """One panel per (title, run, sampler, steps, cfg): 10 samples per class, one row per class."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from selfflow.imageio import make_grid

        entries = [e for e in entries if self.chain.done(e[1])]
        cols = min(4, len(entries))
        rows = math.ceil(len(entries) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (title, name, sampler, steps, cfg) in zip(axes.flat, entries):
            model = self.model(name)
            classes = max(1, model.num_classes)
            n = 10 * classes
            result = self.images(name, sampler, steps, cfg, n)
            order = torch.argsort(result.labels * n + torch.arange(n), stable=True) if result.labels is not None else torch.arange(n)
            grid = make_grid(result.images[order][: 10 * classes], nrow=10)
            ax.imshow(grid.squeeze(), cmap="gray", interpolation="nearest")
            ax.set_title(title, fontsize=7)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)

    def dmd_diagnostics(self, names: list[str], out: Path) -> dict:
        """For each DMD run: G's samples, the real score's (guided teacher) and the fake score's x̂0 at
        t = 0.5 from the same noised sample, side by side, and their mean statistics over a batch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from safetensors.torch import load_file

        from selfflow.checkpoint import resolve_checkpoint
        from selfflow.imageio import make_grid
        from selfflow.methods.one_step import copy_of, dmd_gradient, x0_estimate
        from selfflow.path import interpolate
        from selfflow.sampling import GuidedVelocity, noise_for_seeds

        names = [n for n in names if self.chain.done(n)]
        if not names:
            return {}
        teacher = self.model("teacher")
        stats = {}
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
        for ax, name in zip(axes[0], names):
            folder = resolve_checkpoint(self.chain.folder(name))
            config = json.loads((folder / "config.json").read_text())
            method = config["run"]["method"]
            state = load_file(str(folder / "method.safetensors"))
            fake = copy_of(teacher).eval()
            fake.load_state_dict({k[len("fake."):]: v for k, v in state.items() if k.startswith("fake.")})
            real = GuidedVelocity(teacher, method.get("real_cfg", 1.0), null_label=teacher.num_classes)
            g_model = self.model(name)
            n = 500
            k = method.get("generator_steps", 1)
            result = self.images(name, "euler", k, 1.0, n)
            x = result.images.to(self.device)
            y = result.labels.to(self.device)
            t = torch.full((n,), 0.5, device=self.device)
            eps = noise_for_seeds(range(10**6, 10**6 + n), x.shape[1:], self.device)
            x_t = interpolate(x, eps, t)
            with torch.no_grad():
                x0_real = x0_estimate(x_t, t, real(x_t, t, y))
                x0_fake = x0_estimate(x_t, t, fake(x_t, t, y))
                g = dmd_gradient(x, x0_fake, x0_real)
            stats[name] = {"t": 0.5, "n": n, "generator_steps": k, "real_cfg": method.get("real_cfg"),
                           "mean_x": float(x.mean()), "mean_x0_real": float(x0_real.mean()), "mean_x0_fake": float(x0_fake.mean()),
                           "std_x": float(x.std()), "std_x0_real": float(x0_real.std()), "std_x0_fake": float(x0_fake.std()),
                           "mean_abs_x0_fake_minus_real": float((x0_fake - x0_real).abs().mean()),
                           "dmd_grad_norm_mean": float(g.flatten(1).norm(dim=1).mean()),
                           "cos_g_with_x_minus_x0_real": float(torch.nn.functional.cosine_similarity(
                               g.flatten(1), (x - x0_real).flatten(1), dim=1).mean())}
            del g_model
            pick = torch.cat([torch.nonzero(result.labels == c)[:1, 0] for c in range(min(10, teacher.num_classes or 1))])
            panel = torch.cat([x[pick].cpu(), x0_real[pick].clamp(-1, 1).cpu(), x0_fake[pick].clamp(-1, 1).cpu()])
            ax.imshow(make_grid(panel, nrow=len(pick)).squeeze(), cmap="gray", interpolation="nearest")
            ax.set_title(f"{name}: rows G(ε), x̂0 real, x̂0 fake (t=0.5)", fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        (self.chain.work / "dmd_diagnostics.json").write_text(json.dumps(stats, indent=2))
        return stats


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def relative(record):
    """A record's paths as the repository sees them: under the checkout relative to it, the local data
    copy (a link .carry to elsewhere) as .carry — not the paths of the machine that ran them."""
    text = json.dumps(record)
    carry = ROOT / ".carry"
    if carry.is_symlink():
        text = text.replace(str(carry.resolve()), ".carry")
    return json.loads(text.replace(str(ROOT) + "/", ""))


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def build_rows(chain: Chain, specs: list[dict], evals: list[dict], speed: dict) -> list[dict]:
    """One row per (method group, sampler, steps, guidance): mean ± sd over seeds.

    Every row is judged against the teacher it learns: the teacher at the guidance its training
    target was made with (``learned_cfg``: reflow's pairs', DMD's real score's), at 50 Euler steps
    (FD ratio and speed-up: that teacher's 50-step cost) and at the row's own number of steps."""
    speed_results = speed.get("results", {})
    by_run = {s["name"]: s for s in specs}
    groups: dict[tuple, list[dict]] = {}
    for e in evals:
        if e["run"] == "teacher":
            label, group, learned = (f"teacher ({e['sampler']}, guidance {e['cfg_scale']:g})", f"teacher_{e['sampler']}_cfg{e['cfg_scale']:g}",
                                     e["cfg_scale"])
        else:
            spec = by_run[e["run"]]
            label, group, learned = spec["method"], spec["group"], spec["learned_cfg"]
        groups.setdefault((group, e["sampler"], e["steps"], e["cfg_scale"]), []).append({**e, "label": label, "learned_cfg": learned})
    teacher_at = {(k[1], k[2], k[3]): v[0] for k, v in groups.items() if k[0].startswith("teacher")}
    rows = []
    for (group, sampler, steps, cfg), items in groups.items():
        fds = [i["fd_dom"] for i in items]
        learned = items[0]["learned_cfg"]
        s = speed_results.get(f"{sampler}{steps}_cfg{cfg:g}", {})
        row = {"method": items[0]["label"], "group": group, "sampler": sampler, "steps": steps, "cfg_scale": cfg, "learned_cfg": learned,
               "nfe_per_image": items[0]["nfe_per_image"],
               "seeds": sorted(by_run[i["run"]]["seed"] for i in items) if items[0]["run"] in by_run else [0],
               "fd_dom_values": fds, "fd_dom": statistics.mean(fds), "fd_dom_sd": statistics.stdev(fds) if len(fds) > 1 else None,
               "class_accuracy": statistics.mean(i["class_accuracy"] for i in items),
               "class_accuracy_values": [i["class_accuracy"] for i in items],
               "precision": statistics.mean(i["precision"] for i in items), "recall": statistics.mean(i["recall"] for i in items),
               "precision_values": [i["precision"] for i in items], "recall_values": [i["recall"] for i in items],
               "pixel_mean": statistics.mean(i["pixel_mean"] for i in items), "pixel_std": statistics.mean(i["pixel_std"] for i in items),
               "images_per_s_b256": s.get("images_per_s_b256"), "ms_per_image_b1": s.get("ms_per_image_b1")}
        target = teacher_at.get(("euler", 50, learned))  # the teacher it learns, 50 Euler steps
        if target:
            row["learned_teacher"] = {"cfg_scale": learned, "steps": 50, "nfe_per_image": target["nfe_per_image"], "fd_dom": target["fd_dom"],
                                      "class_accuracy": target["class_accuracy"]}
            row["fd_dom_vs_learned_teacher"] = row["fd_dom"] / target["fd_dom"]
        same = teacher_at.get(("euler", steps, learned))  # that teacher at the student's own number of steps
        if same and not group.startswith("teacher"):
            row["learned_teacher_same_steps"] = {"steps": steps, "nfe_per_image": same["nfe_per_image"], "fd_dom": same["fd_dom"],
                                                 "class_accuracy": same["class_accuracy"]}
            row["fd_dom_vs_learned_teacher_same_steps"] = row["fd_dom"] / same["fd_dom"]
        unguided = teacher_at.get(("euler", 50, 1.0))
        if unguided:
            row["fd_dom_vs_teacher50_guidance1"] = row["fd_dom"] / unguided["fd_dom"]
        base_speed = speed_results.get(f"euler50_cfg{learned:g}", {})  # the learned teacher's 50-step cost
        if base_speed and s:
            row["speedup_b256_vs_teacher50"] = s["images_per_s_b256"] / base_speed["images_per_s_b256"]
            row["speedup_b1_vs_teacher50"] = base_speed["ms_per_image_b1"] / s["ms_per_image_b1"]
        rows.append(row)
    order = ["reflow1", "reflow2", "distill1_l2", "distill1_pseudo_huber", "distill1_feature", "distill2_l2", "distill4_l2", "dmd", "dmd_noreg",
             "dmd2", "dmd2_4step"]
    rows.sort(key=lambda r: (not r["group"].startswith("teacher"), r["group"] if r["group"].startswith("teacher") else "",
                             order.index(r["group"]) if r["group"] in order else len(order), -r["nfe_per_image"]))
    return rows


def teacher_summary(rows: list[dict]) -> dict:
    """The 50-step Euler teacher at each guidance it was scored at: class accuracy and FD_dom."""
    out = {}
    for r in rows:
        if r["group"].startswith("teacher_euler") and r["steps"] == 50:
            out[f"{r['cfg_scale']:g}"] = {"steps": 50, "sampler": "euler", "cfg_scale": r["cfg_scale"], "nfe_per_image": r["nfe_per_image"],
                                          "fd_dom": r["fd_dom"], "class_accuracy": r["class_accuracy"], "precision": r["precision"],
                                          "recall": r["recall"]}
    first = out.get("1") or next(iter(out.values()), {})
    return {**{k: first.get(k) for k in ("class_accuracy", "fd_dom", "cfg_scale", "steps", "nfe_per_image")}, "by_guidance": out}


def fmt(value, spec=".3f") -> str:
    return "—" if value is None else format(value, spec)


def ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def row_cells(r: dict) -> list[str]:
    n = len(r["fd_dom_values"])
    same = r.get("learned_teacher_same_steps")
    return [r["method"], f"{r['sampler']} {r['steps']}", f"{r['nfe_per_image']:g}", f"{r['learned_cfg']:g}", mean_sd(r["fd_dom_values"]),
            ratio(r.get("fd_dom_vs_learned_teacher")),
            (ratio(r.get("fd_dom_vs_learned_teacher_same_steps")) + f" (NFE {same['nfe_per_image']:g})") if same else "—",
            mean_sd(r["class_accuracy_values"]), mean_sd(r["precision_values"]), mean_sd(r["recall_values"]),
            fmt(r.get("images_per_s_b256"), ".0f"), fmt(r.get("ms_per_image_b1"), ".2f"),
            fmt(r.get("speedup_b256_vs_teacher50"), ".1f") + "×" if r.get("speedup_b256_vs_teacher50") else "—",
            fmt(r.get("speedup_b1_vs_teacher50"), ".1f") + "×" if r.get("speedup_b1_vs_teacher50") else "—", str(n)]


def markdown(report: dict) -> str:
    a, e, m = report["settings"], report["evaluation"], report["machine"]
    rows = report["rows"]
    lines = [f"# One-step generation on {report['data']} ({report['device']})", "",
             f"Command: `{report['command']}`", "",
             *([f"Rebuilt from `{report['rebuilt_from']}` (the evaluations and timings of the command above; its runs' records are "
                f"gone) by `{report['rebuild_command']}`: this version's rows and verdicts.", ""] if report.get("rebuilt_from") else []),
             *([f"Note: {report['note']}", ""] if report.get("note") else []),
             f"Machine: {m.get('gpu', m['cpu'])}, {m['cpu_count']} CPUs, torch {m['torch']}; training {a['threads']} thread(s) "
             f"per command, timing {report['speed'].get('threads')} thread(s), shared with other jobs (ratios are within this run).",
             f"Chain (every command below, in {report['work']}): teacher Self-Flow "
             f"{'(' + a['teacher_run'] + ')' if a.get('teacher_run') else str(a['teacher_steps']) + ' steps'} → "
             f"{a['pairs']} teacher pairs (Heun {a.get('pairs_steps', 32)} steps, guidance {a.get('pairs_cfg', 1.0):g}) → reflow {a['reflow_steps']} steps → pairs of the reflowed "
             f"model → distillation {a['distill_steps']} steps (1, 2, 4 Euler steps); DMD {a['dmd_steps']} steps ("
             + (f"regression weight {a.get('regression_weight', 0.25):g} on {a['pairs']} pairs of the teacher at guidance "
                f"{a.get('guidance', 1.5):g}; and without it" if a.get("regression_weight", 0.25) else "without its regression loss")
             + f") "
             f"and DMD2 {a['dmd2_steps']} steps (1 generator update in 5) from the teacher, real score at guidance {a.get('guidance', 1.5):g}; model {a['model']} ({report['model']}).",
             *([f"Students trained in this run (`--only`): {', '.join(a['only'])}; the others in the chain above were not run.", ""]
               if a.get("only") else []),
             f"Metric: **FD_dom** in the 128-d features of the project's FD_dom classifier (`{Path(e['fd_net']).name}`, test "
             f"accuracy {e['fd_net_test_accuracy']:.3f}, sha256 `{e['fd_net_sha256'][:16]}…`) of {e['num_samples']} generated images "
             f"(seeds {e['sample_seeds']}, labels {e['labels']}) against the {e['reference']}; class accuracy under the same "
             f"classifier; k-NN precision/recall (k = 3) in the same features. Real-data floor ({e['floor_count']} test images): "
             f"FD_dom {e['floor_fd_dom']:.3f}. "
             + (f"Speed: {report['speed']['note']}. " if report["speed"].get("note") else
                f"Speed: `selfflow.sampling.generate` on {report['speed'].get('device')}, after a "
                f"warm-up, every setting timed in turns, median of {report['speed'].get('rounds')} rounds; students have the "
                f"teacher's architecture, so each (sampler, steps, guidance) was timed once, on the teacher. ")
             + f"Students: mean ± sd over seeds {a['seeds']}.", ""]
    target = report.get("target")
    if target:
        lines += ["## Target", "", target["text"], ""]
    lines += ["## All models", "",
              "Each row against the teacher it learns: the teacher at the guidance its training target was made with (reflow and "
              "distillation: the pairs'; DMD/DMD2: the real score's), at 50 Euler steps (FD ratio; speed-up against that teacher's "
              "50-step cost, a guided step counting two evaluations) and at the row's own number of steps.", "",
              "| method | sampler, steps | NFE/image | learns guidance | FD_dom | ÷ learned teacher, 50 steps | ÷ learned teacher, same steps "
              "| class acc. | precision | recall | images/s (batch 256) | ms/image (batch 1) | speed-up, batch 256 | speed-up, batch 1 | seeds |",
              "|" + "---|" * 15]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    loss = report.get("loss_comparison")
    if loss:
        lines += ["", "## Distillation loss, 1-step student", "",
                  "| loss | FD_dom | class acc. | precision | recall | seeds |", "|---|---|---|---|---|---|"]
        for r in loss["rows"]:
            lines.append(f"| {r['loss']} | {mean_sd(r['fd_dom_values'])} | {mean_sd(r['class_accuracy_values'])} | "
                         f"{mean_sd(r['precision_values'])} | {mean_sd(r['recall_values'])} | {r['seeds']} |")
        lines += ["", loss["text"]]
    s = report.get("straightness")
    if s:
        lines += ["", "## Straightness", "",
                  "S = ∫ E‖(ε − x̂0) − v(x_t, t)‖² dt along each model's own Euler path (32 steps, guidance 1) from the same "
                  f"noise (seeds {next(iter(s.values()))['noise'].split(' ', 1)[1]}); 0 = straight paths.", "",
                  "| model | straightness | vs teacher |", "|---|---|---|"]
        base = s.get("teacher", {}).get("straightness")
        for name, v in s.items():
            lines.append(f"| {name} | {v['straightness']:.4f} | {v['straightness'] / base:.3f}× |" if base else
                         f"| {name} | {v['straightness']:.4f} | — |")
    d = report.get("dmd_diagnostics")
    if d:
        lines += ["", "## DMD diagnostics", "",
                  f"![generator output, real and fake x̂0]({Path(report['out']).name}_dmd.png)", "",
                  "Generator samples x (guidance 1 sampling of G; the real score is the teacher at guidance `real_cfg`), "
                  "noised to t = 0.5 with fresh noise, and both scores' x̂0 there (500 samples). Real data: mean "
                  f"{e['real_mean']:.3f}, std {e['real_std']:.3f}.", "",
                  "| run | mean x | mean x̂0 real | mean x̂0 fake | std x | std x̂0 real | std x̂0 fake | mean abs(x̂0 fake − x̂0 real) | mean norm of g | cos(g, x − x̂0 real) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in d.items():
            lines.append(f"| {name} | {v['mean_x']:.3f} | {v['mean_x0_real']:.3f} | {v['mean_x0_fake']:.3f} | {v['std_x']:.3f} | "
                         f"{v['std_x0_real']:.3f} | {v['std_x0_fake']:.3f} | {v['mean_abs_x0_fake_minus_real']:.3f} | "
                         f"{v['dmd_grad_norm_mean']:.3f} | {v['cos_g_with_x_minus_x0_real']:.3f} |")
        if report.get("dmd_text"):
            lines += ["", report["dmd_text"]]
    lines += ["", f"![FD_dom vs network evaluations]({Path(report['out']).name}.png)", "",
              f"Samples (one row per class, seed-0 runs): ![samples]({Path(report['out']).name}_samples.png)", "",
              "## How each run was made", "", "| stage | seconds | command |", "|---|---|---|"]
    for name, r in report["stages"].items():
        if r:
            lines.append(f"| {name} | {r['seconds']:.0f} | `{r['command']}` |")
    if report.get("gpu_command"):
        lines += ["", "## On a GPU (not run here)", "", "MNIST 28×28, DiT size S/2, bf16:", "", f"```bash\n{report['gpu_command']}\n```"]
    if report.get("notes"):
        lines += ["", "## Notes", "", *report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    guided = sorted({r["group"] for r in rows if r["group"].startswith("teacher_euler_cfg") and r["group"] != "teacher_euler_cfg1"})
    for group, style, label in (("teacher_euler_cfg1", "o-", "teacher, Euler"), ("teacher_heun_cfg1", "s--", "teacher, Heun"),
                                *((g, "^:", f"teacher, Euler, guidance {g.rsplit('cfg', 1)[1]}") for g in guided),
                                ("reflow1", "d-", "1-rectified flow, Euler"), ("reflow2", "d--", "2-rectified flow, Euler")):
        pts = sorted((r["nfe_per_image"], r["fd_dom"]) for r in rows if r["group"] == group)
        if pts:
            ax.plot(*zip(*pts), style, ms=4, label=label, color="grey" if "reflow" in group else None, alpha=0.9 if "teacher" in group else 0.6)
    markers = iter("*PXvDph<>")
    for r in rows:
        if r["group"].startswith(("teacher", "reflow")):
            continue
        ax.errorbar([r["nfe_per_image"]], [r["fd_dom"]], yerr=[[r["fd_dom_sd"] or 0], [r["fd_dom_sd"] or 0]], fmt=next(markers, "o"),
                    ms=8, capsize=3, label=f"{r['method']} (n={len(r['fd_dom_values'])})")
    floor = report["evaluation"]["floor_fd_dom"]
    ax.axhline(floor, color="black", ls=":", lw=0.8, label="real test images (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("FD_dom (lower is better)")
    ax.set_title(f"{report['data']}: teacher vs one/few-step students")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def target_misses(row: dict) -> list[str]:
    """Which parts of issue 19's target a one-step row misses (empty: met): speed-up at batch 256 against the
    50-step teacher it learns ≥ 30×, mean FD_dom ≤ 1.2× that teacher's, ≥ 2 seeds, teacher ≥ 90 % class accuracy."""
    misses = []
    if row["speedup_b256_vs_teacher50"] < 30:
        misses.append(f"speed-up {row['speedup_b256_vs_teacher50']:.1f}× < 30×")
    if row["fd_dom_vs_learned_teacher"] > 1.2:
        misses.append(f"FD_dom {row['fd_dom_vs_learned_teacher']:.2f}× > 1.2× the teacher it learns")
    if len(row["fd_dom_values"]) < 2:
        misses.append(f"{len(row['fd_dom_values'])} seed < 2")
    if row["learned_teacher"]["class_accuracy"] < 0.9:
        misses.append(f"teacher's class accuracy {row['learned_teacher']['class_accuracy']:.3f} < 0.9")
    return misses


def analyse(report: dict) -> None:
    """The target check, the loss comparison and the DMD verdict, computed from the records (never typed in)."""
    rows = report["rows"]
    teacher = report["teacher"]
    one_step = [r for r in rows if r["steps"] == 1 and not r["group"].startswith("teacher") and r.get("speedup_b256_vs_teacher50")
                and r.get("fd_dom_vs_learned_teacher") is not None]
    floor = report["evaluation"]["floor_fd_dom"]
    lines = ["Target (issue 19): a one-step student ≥ 30× faster than the 50-step teacher it learns (same guidance) with FD_dom "
             "≤ 1.2× that teacher's, over ≥ 2 seeds, from a teacher with ≥ 90 % class accuracy.", "",
             "Teacher (Euler 50 steps): " + "; ".join(
                 f"guidance {g}: class accuracy {v['class_accuracy']:.3f}, FD_dom {v['fd_dom']:.3f} ({v['fd_dom'] / floor:.1f}× the real "
                 f"floor {floor:.3f})" for g, v in teacher["by_guidance"].items()) + ".",
             f"Teacher ≥ 90 % class accuracy: **{'yes' if (teacher.get('class_accuracy') or 0) >= 0.9 else 'no'}** at guidance 1"
             + "".join(f", **{'yes' if v['class_accuracy'] >= 0.9 else 'no'}** at guidance {g}" for g, v in teacher["by_guidance"].items()
                       if g != "1") + ".", "",
             "One-step students (speed-up at batch 256 / at batch 1 against the learned teacher's 50 steps):", ""]
    met, missed = [], {}
    for r in one_step:
        missed[r["method"]] = target_misses(r)  # a student of a teacher that cannot draw proves nothing
        ok = not missed[r["method"]]
        met += [r] if ok else []
        same = r.get("learned_teacher_same_steps")
        lines.append(f"- {r['method']} (learns guidance {r['learned_cfg']:g}): {r['speedup_b256_vs_teacher50']:.1f}× / "
                     f"{r.get('speedup_b1_vs_teacher50', float('nan')):.1f}× faster, FD_dom {r['fd_dom']:.3f} = "
                     f"{r['fd_dom_vs_learned_teacher']:.2f}× the learned teacher's 50-step {r['learned_teacher']['fd_dom']:.3f}"
                     + (f", {r['fd_dom_vs_learned_teacher_same_steps']:.2f}× its 1-step {same['fd_dom']:.3f}" if same else "")
                     + f", {len(r['fd_dom_values'])} seed(s)"
                     + f" → **{'met' if ok else 'not met'}**" + ("" if ok else f" ({'; '.join(missed[r['method']])})"))
    best = None
    if one_step:
        fast = met or [r for r in one_step if r["speedup_b256_vs_teacher50"] >= 30] or one_step
        best = min(fast, key=lambda r: r["fd_dom_vs_learned_teacher"])
        lines += ["", f"Met by any: **{'yes' if met else 'no'}**. Closest one-step model: {best['method']} "
                  f"(FD_dom {best['fd_dom_vs_learned_teacher']:.2f}× the teacher it learns"
                  + (f"; misses: {'; '.join(missed[best['method']])}" if missed[best["method"]] else "") + ")."]
    report["target"] = {"text": "\n".join(lines), "met": [r["method"] for r in met], "closest": best["method"] if best else None,
                        "closest_misses": missed.get(best["method"], []) if best else None}

    loss_rows = []
    for loss in ("l2", "pseudo_huber", "feature"):
        r = next((r for r in rows if r["group"] == f"distill1_{loss}"), None)
        if r:
            loss_rows.append({"loss": loss, "fd_dom_values": r["fd_dom_values"], "class_accuracy_values": r["class_accuracy_values"],
                              "precision_values": r["precision_values"], "recall_values": r["recall_values"], "seeds": r["seeds"]})
    if len(loss_rows) > 1:
        # compare on the seeds every loss has (seed 0 first)
        common = sorted(set.intersection(*(set(r["seeds"]) for r in loss_rows)))
        def on_common(r):
            return statistics.mean(v for s, v in zip(r["seeds"], r["fd_dom_values"]) if s in common)
        best = min(loss_rows, key=on_common)
        text = (f"On the seeds all three share ({common}), the lowest FD_dom is **{best['loss']}** ("
                + ", ".join(f"{r['loss']} {on_common(r):.3f}" for r in loss_rows) + ").")
        report["loss_comparison"] = {"rows": loss_rows, "best": best["loss"], "common_seeds": common, "text": text}


def rebuild(args) -> int:
    """--from-report: the earlier report's evaluations and timings under this version's rows and verdicts."""
    old = json.loads(Path(args.from_report).read_text())
    without_regression = not any("regression_weight=" in (r or {}).get("command", "") and "regression_weight=0" not in r["command"]
                                 for name, r in old["stages"].items() if name.startswith("dmd_"))
    rename = {}
    if without_regression:  # those runs were DMD without its regression loss
        rename = {name: "dmd_noreg_" + name[len("dmd_"):] for name in {e["run"] for e in old["evals"]} if name.startswith("dmd_s")}
    evals = [{**e, "run": rename.get(e["run"], e["run"])} for e in old["evals"]]
    args.seeds = old["settings"]["seeds"]
    args.loss_seeds = old["settings"].get("loss_seeds", [0])
    args.reflow_rounds = old["settings"].get("reflow_rounds", 1)
    args.only = None
    real_cfg = [d.get("real_cfg") for d in (old.get("dmd_diagnostics") or {}).values() if d.get("real_cfg")]
    args.guidance = real_cfg[0] if real_cfg else args.guidance
    specs = Chain.student_specs(types.SimpleNamespace(args=args))
    report = {**old, "rebuilt_from": args.from_report, "rebuild_command": " ".join(["python", *map(shlex.quote, sys.argv)]),
              "out": str(args.out), "evals": evals, "dmd_text": "".join(
                  (rename.get(w, w) if w.rstrip(":") not in rename else rename[w.rstrip(":")] + ":") for w in
                  __import__("re").split(r"(\s+)", old.get("dmd_text", ""))) or None,
              "stages": {rename.get(k, k): v for k, v in old["stages"].items()},
              "dmd_diagnostics": {rename.get(k, k): v for k, v in (old.get("dmd_diagnostics") or {}).items()},
              "settings": {**old["settings"], "guidance": args.guidance, "pairs_cfg": 1.0,
                           "regression_weight": 0.0 if without_regression else old["settings"].get("regression_weight")}}
    report["rows"] = build_rows(None, specs, evals, old["speed"])
    report["teacher"] = teacher_summary(report["rows"])
    for key in ("target", "loss_comparison"):
        report.pop(key, None)
    analyse(report)
    if args.note:
        report["note"] = args.note
    if args.notes_file:
        report["notes"] = [Path(args.notes_file).read_text().strip(), "", f"(Notes from `{args.notes_file}`.)"]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    log(f"rebuilt {out.with_suffix('.md')} from {args.from_report}")
    return 0


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-path", default=None, help="MNIST folder (default: data/mnist, else .carry/mnist)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command and of the timing")
    parser.add_argument("--work", required=True, help="folder of the runs, pairs and records")
    parser.add_argument("--out", required=True, help="output prefix under docs/benchmarks: <out>.json/.md/.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the students")
    parser.add_argument("--loss-seeds", type=int, nargs="*", default=[0],
                        help="seeds of the pseudo-Huber and feature-loss students (none given: those students are not trained)")
    parser.add_argument("--model", choices=list(MODEL_PRESETS), default=None)
    for name in ("teacher_steps", "pairs", "reflow_steps", "distill_steps", "dmd_steps", "dmd2_steps", "num_samples", "fd_steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument("--teacher-lr", type=float, default=None)
    parser.add_argument("--teacher-run", default=None, help="an existing teacher run folder (e.g. from configs/mnist_teacher_cpu.yaml) "
                        "instead of training one; --model must name its architecture")
    parser.add_argument("--guidance", type=float, default=1.5, help="the real score's guidance of DMD/DMD2 (method.real_cfg), and of "
                        "DMD's regression pairs")
    parser.add_argument("--pairs-cfg", type=float, default=1.0, help="guidance of the teacher pairs reflow learns")
    parser.add_argument("--pairs-steps", type=int, default=32, help="Heun steps of every pair set")
    parser.add_argument("--no-heun", action="store_true", help="score the teacher with Euler only (saves CPU time)")
    parser.add_argument("--teacher-euler", type=int, nargs="+", default=TEACHER_EULER, help="Euler steps the teacher is scored at")
    parser.add_argument("--guided-euler", type=int, nargs="+", default=[50, 4, 2, 1],
                        help="Euler steps the guided teachers (--guidance, --pairs-cfg) are scored at")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing (no images/s, latency or speed-up columns)")
    parser.add_argument("--regression-weight", type=float, default=0.25, help="DMD's regression weight (the paper's λ_reg)")
    parser.add_argument("--reflow-rounds", type=int, choices=[1, 2], default=2)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE", help="extra override for the teacher")
    parser.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every student")
    parser.add_argument("--only", nargs="+", default=None, help="train only these student groups (e.g. distill1_l2 dmd)")
    parser.add_argument("--skip-eval", action="store_true", help="train only")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the records, run nothing")
    parser.add_argument("--from-report", default=None, metavar="JSON",
                        help="rebuild --out's report from an earlier report's evaluations (its runs' records gone): the rows and "
                        "verdicts of this version; DMD runs made without the regression become 'DMD (no regression)'")
    parser.add_argument("--note", default=None)
    parser.add_argument("--notes-file", default=None, help="Markdown appended as the report's 'Notes' (the reading of the figures)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.from_report:
        return rebuild(args)
    torch.set_num_threads(args.threads)
    chain = Chain(args)
    chain.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stages = chain.run_all()
    if args.skip_eval:
        return 0
    specs = chain.student_specs()
    evaluator = Evaluator(chain)
    done = chain.done
    settings = [("euler", k, 1.0) for k in args.teacher_euler] + ([] if args.no_heun else [("heun", k, 1.0) for k in TEACHER_HEUN])
    for cfg in sorted({args.guidance, args.pairs_cfg} - {1.0}):  # the guided teachers the students learn, at their step counts
        settings += [("euler", k, cfg) for k in args.guided_euler]
    evals = []
    for sampler, steps, cfg in settings if done("teacher") else []:
        path = chain.work / "evals" / f"teacher__{sampler}{steps}_cfg{cfg:g}_n{args.num_samples}.json"
        if not args.report_only or path.is_file():
            evals.append(evaluator.score("teacher", sampler, steps, cfg))
    for spec in specs:
        if not done(spec["name"]):
            continue
        for steps in spec["steps"]:
            path = chain.work / "evals" / f"{spec['name']}__euler{steps}_cfg1_n{args.num_samples}.json"
            if not args.report_only or path.is_file():
                evals.append(evaluator.score(spec["name"], "euler", steps, 1.0))
    speed_settings = sorted({(e["sampler"], e["steps"], e["cfg_scale"]) for e in evals})
    speed = {"results": {}, "note": "not timed (--no-speed)"} if args.no_speed else evaluator.speed(speed_settings)
    # straightness compares the teacher with its reflowed models: only where one was trained
    reflows = [reflow_name(1, args.seeds[0]), reflow_name(2, args.seeds[0])]  # the first seed's rounds
    straight = evaluator.straightness(["teacher", *reflows]) if any(done(n) for n in reflows) else {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seed0 = args.seeds[0]
    grid_entries = [("teacher, Euler 50", "teacher", "euler", 50, 1.0), ("teacher, Euler 1", "teacher", "euler", 1, 1.0),
                    ("1-rectified flow, Euler 1", reflow_name(1, seed0), "euler", 1, 1.0),
                    ("distill 1 step (l2)", f"distill1_l2_s{seed0}", "euler", 1, 1.0),
                    ("distill 2 steps (l2)", f"distill2_l2_s{seed0}", "euler", 2, 1.0),
                    ("distill 4 steps (l2)", f"distill4_l2_s{seed0}", "euler", 4, 1.0),
                    ("DMD, 1 step", f"dmd_s{seed0}", "euler", 1, 1.0), ("DMD (no regression)", f"dmd_noreg_s{seed0}", "euler", 1, 1.0),
                    ("DMD2, 1 step", f"dmd2_s{seed0}", "euler", 1, 1.0),
                    ("DMD2, 4 steps", f"dmd2_4step_s{seed0}", "euler", 4, 1.0)]
    if not args.report_only or not out.with_name(out.name + "_samples.png").is_file():
        evaluator.grids(grid_entries, out.with_name(out.name + "_samples.png"))
    dmd_path = chain.work / "dmd_diagnostics.json"
    if args.report_only and dmd_path.is_file():
        dmd = json.loads(dmd_path.read_text())
    else:
        dmd = evaluator.dmd_diagnostics([f"dmd_s{seed0}", f"dmd_noreg_s{seed0}", f"dmd2_s{seed0}", f"dmd2_4step_s{seed0}"],
                                        out.with_name(out.name + "_dmd.png"))

    import yaml

    teacher_yaml = chain.folder("teacher") / "config.yaml"  # the resolved config the trainer wrote
    teacher_config = yaml.safe_load(teacher_yaml.read_text()) if teacher_yaml.is_file() else {}
    from convergence import describe_model

    all_stages = {**stages}
    for spec in specs:
        marker = chain.runs / spec["name"] / "stage.json"
        if marker.is_file():
            all_stages[spec["name"]] = json.loads(marker.read_text())
    report = {
        "benchmark": "one_step", "command": " ".join(["python", *map(shlex.quote, sys.argv)]), "data": args.data,
        "device": args.device, "work": str(Path(args.work)), "out": str(out), "note": args.note,
        "machine": speed.get("machine") or machine(args.device), "model": describe_model(teacher_config["model"]) if teacher_config else args.model,
        "settings": {k: getattr(args, k) for k in ("model", "teacher_steps", "teacher_lr", "pairs", "reflow_steps", "distill_steps",
                                                    "dmd_steps", "dmd2_steps", "num_samples", "fd_steps", "seeds", "loss_seeds",
                                                    "reflow_rounds", "threads", "speed_rounds", "teacher_run", "guidance",
                                                    "pairs_cfg", "pairs_steps", "regression_weight", "only")},
        "evaluation": relative(evaluator.info), "speed": {k: v for k, v in speed.items() if k != "machine"}, "straightness": straight,
        "dmd_diagnostics": dmd, "stages": {k: relative(v) for k, v in all_stages.items()}, "evals": evals, "rows": (rows := build_rows(chain, specs, evals, speed)),
        "teacher": teacher_summary(rows),
        "wall_seconds_this_invocation": time.time() - started,
        "gpu_command": ("python benchmarks/one_step.py --data mnist --data-path .carry/mnist --device cuda --threads 8 --model S "
                        "--teacher-steps 20000 --teacher-lr 2e-4 --teacher-set train.batch_size=256 --pairs 20000 --reflow-steps 4000 "
                        "--distill-steps 2000 --dmd-steps 2000 --dmd2-steps 5000 --student-set train.batch_size=256 --num-samples 10000 "
                        "--work runs/one_step_mnist_gpu --out docs/benchmarks/one_step_mnist_gpu"),
    }
    if args.notes_file:
        report["notes"] = [Path(args.notes_file).read_text().strip(), "", f"(Notes from `{args.notes_file}`.)"]
    analyse(report)
    if dmd:
        parts = []
        for name, v in dmd.items():
            drift = v["mean_x"] - evaluator.info["real_mean"]
            parts.append(f"{name}: mean of G's samples {v['mean_x']:.3f} (real data {evaluator.info['real_mean']:.3f}, drift {drift:+.3f}), "
                         f"std {v['std_x']:.3f} (real {evaluator.info['real_std']:.3f})")
        report["dmd_text"] = "Measured: " + "; ".join(parts) + "."
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    log(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
