"""``selfflow pipeline``: real data → Self-Flow teacher → one-step student → synthetic set → StableRep
encoder → probes → one HTML report (and its Markdown twin).

Stages, each in its own folder under ``pipeline.out_dir`` and each a call of the library the
commands use (the one trainer, ``generate_set``, ``make_synth_set``, ``run_probes``):

============  ====================================================================================
``teacher``   ``selfflow train`` on the real data (Self-Flow in the quickstart)
``student``   ``distill``: teacher (noise, image) pairs, then ``selfflow distill one-step`` from the
              teacher; ``dmd2``: ``selfflow distill dmd2``; ``teacher_sampler``: none (the teacher's
              few-step sampler stands in for it)
``evaluate``  sample grids, FD_dom against the real test split and class accuracy of the teacher,
              the teacher at the student's step count, and the student
``synth``     a captioned synthetic set from the student (or the teacher)
``encoder``   StableRep on the synthetic set (``selfflow represent train``)
``probes``    linear, k-NN and few-shot probes of the frozen encoder on the real data, with raw
              pixels and the untrained encoder as references
============  ====================================================================================

Resumable stage by stage: a finished stage writes ``<stage>/stage.json`` holding a hash of its
settings and of its inputs' markers. A stage whose marker matches is skipped; a changed setting
changes its hash, so the stage re-runs (the files it wrote are removed first, nothing else) and so
does every stage that reads it. Evaluation-only settings (the ``sample`` sections, ``evaluate.*``) are settings of the stages
that sample, never of a training stage. A stage interrupted with the same settings resumes (the trainer
from its checkpoint, a synthetic set from its finished shards). A training stage cut by its
``train.time_limit_minutes`` records that (status ``time_limit``, the step reached, the limit); a run
with a larger limit (or none) continues it from its checkpoint instead of accepting it, and the stages
reading it re-run (they see its hash and its step). The report is rebuilt on every run.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from selfflow.config import PipelineConfig
from selfflow.errors import ConfigError
from selfflow.files import check_output_folder, lock_folder, mark_output_folder, write_json

STAGES = ("teacher", "student", "evaluate", "synth", "encoder", "probes")
INPUTS = {"teacher": (), "student": ("teacher",), "evaluate": ("teacher", "student"), "synth": ("teacher", "student"),
          "encoder": ("synth",), "probes": ("encoder",)}
MARKER, PENDING = "stage.json", "stage.pending.json"


# --------------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------------
def _training_settings(run: dict | None) -> dict | None:
    """What a training stage's weights depend on: its run dict without train.progress (a progress bar),
    train.time_limit_minutes (a cut stage records it and continues under a larger limit) and the sample
    section (how the model is sampled afterwards: read by the stages that sample it)."""
    if run is None:
        return None
    run = json.loads(json.dumps(run))
    run.get("train", {}).pop("progress", None)
    run.get("train", {}).pop("time_limit_minutes", None)
    run.pop("sample", None)
    return run


def _sample_of(d: dict, generator: str) -> dict | None:
    """The sample section of the teacher's or the student's run in the pipeline dict ``d``."""
    if generator == "teacher":
        return d["teacher"].get("sample")
    return (d["student"].get("run") or {}).get("sample")


def stage_settings(config: PipelineConfig, stage: str) -> dict:
    """What a stage's result depends on, besides its inputs. Paths inside the pipeline's folder are
    written relative to it (``<out_dir>/teacher``), so a moved or copied pipeline folder stays valid.
    Evaluation-only settings (the teacher's and student's ``sample`` sections) belong to the stages that
    sample (evaluate, synth), not to the training stages."""
    d = json.loads(json.dumps(config.to_dict()).replace(json.dumps(str(Path(config.pipeline.out_dir)))[1:-1], "<out_dir>"))
    if stage == "teacher":
        return _training_settings(d["teacher"])
    if stage == "student":
        return {**d["student"], "run": _training_settings(d["student"]["run"])}
    if stage == "evaluate":
        return {**d["evaluate"], "teacher_sample": _sample_of(d, "teacher"), "student_sample": _sample_of(d, "student")}
    if stage == "synth":
        return {**d["synth"], "generator_sample": _sample_of(d, d["synth"]["generator"])}
    if stage == "encoder":
        return _training_settings(d["encoder"])
    if stage == "probes":
        return d["probes"]
    raise KeyError(stage)


TRAINING_STAGES = {"teacher": lambda c: c.teacher, "student": lambda c: c.student.run, "encoder": lambda c: c.encoder}


def time_limit(config: PipelineConfig, stage: str) -> float:
    """The training stage's train.time_limit_minutes (0: none, and for stages that do not train)."""
    run = TRAINING_STAGES[stage](config) if stage in TRAINING_STAGES else None
    return float(run.train.time_limit_minutes or 0) if run is not None else 0.0


def continues(done: dict, limit: float) -> bool:
    """Whether a stage its time limit cut (``done``, its marker) goes on under the limit ``limit`` (0: none)."""
    if (done.get("result") or {}).get("status") != "time_limit":
        return False
    return limit == 0 or limit > float(done.get("time_limit_minutes") or 0)


def output_id(marker: dict) -> str:
    """What the stages reading this one see of it: its hash, and the step it reached (a continued stage changes it)."""
    steps = (marker.get("result") or {}).get("steps")
    return marker["hash"] if steps is None else f"{marker['hash']}@{steps}"


def stage_hash(stage: str, settings: dict, inputs: dict[str, str]) -> str:
    text = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(folder: Path, name: str = MARKER) -> dict | None:
    try:
        marker = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "hash" in marker else None


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
def run_pipeline(config: PipelineConfig, say: Callable[[str], None] = print) -> Path:
    """Run (or finish) every stage, then write the report; returns the path of ``report.html``."""
    from selfflow.device import resolve_device

    out = Path(config.pipeline.out_dir)
    check_output_folder(out, "pipeline", recognise=("pipeline.json",), flag="pipeline.out_dir")
    device = resolve_device(config.pipeline.device)
    threads = torch.get_num_threads()
    if config.pipeline.threads:
        torch.set_num_threads(config.pipeline.threads)
    try:
        with lock_folder(out, "pipeline folder"):  # one pipeline per folder; its stages lock their own run folders
            mark_output_folder(out, "pipeline")
            return _run(config, out, device, say)
    finally:
        torch.set_num_threads(threads)


def _run(config: PipelineConfig, out: Path, device, say) -> Path:
    write_json(config.to_dict(), out / "pipeline.json")
    markers: dict[str, dict] = {}
    ran: dict[str, bool] = {}
    started = time.perf_counter()
    for stage in STAGES:
        folder = config.stage_dir(stage)
        inputs = {name: output_id(markers[name]) for name in INPUTS[stage]}
        digest = stage_hash(stage, stage_settings(config, stage), inputs)
        done = read_marker(folder)
        limit = time_limit(config, stage)
        if done is not None and done["hash"] == digest:
            if not continues(done, limit):
                cut = (done.get("result") or {}).get("cut")
                say(f"[pipeline] {stage}: done before ({done.get('seconds', 0):.0f} s, settings unchanged) — skipped"
                    + (f"; {cut} (raise it to continue)" if cut else ""))
                markers[stage], ran[stage] = done, False
                continue
            say(f"[pipeline] {stage}: {done['result'].get('cut', 'cut by its time limit')}; continuing under "
                f"train.time_limit_minutes={limit:g}")
            (folder / MARKER).unlink()
            write_json({"hash": digest, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "continues": True,
                        "before": done.get("before", [])}, folder / PENDING)
            done = None
        _prepare(folder, digest, done, say)
        say(f"[pipeline] {stage}: running")
        t0 = time.perf_counter()
        before = set(read_marker(folder, PENDING).get("before", []))
        try:
            result = STAGE_FUNCTIONS[stage](config, folder, markers, device, say)
        except BaseException:  # interrupted or failed: record what the stage wrote so far (a changed stage removes just that)
            _record_written(folder, before)
            raise
        seconds = time.perf_counter() - t0
        marker = {"stage": stage, "hash": digest, "inputs": inputs, "settings": stage_settings(config, stage),
                  "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result,
                  "before": sorted(before), "written": sorted(set(_files(folder)) - before - {PENDING})}
        if stage in TRAINING_STAGES:
            marker["time_limit_minutes"] = limit
        write_json(marker, folder / MARKER)
        (folder / PENDING).unlink(missing_ok=True)
        markers[stage], ran[stage] = marker, True
        say(f"[pipeline] {stage}: {result.get('status', 'finished')} in {seconds:.1f} s")
    from selfflow.pipeline_report import write_report

    return write_report(config, markers, ran, device, time.perf_counter() - started)


# What a stage wrote, to remove when its settings change: the marker's "written" list (recorded when
# it finished, or when it was interrupted in this process); after a hard kill, the files under these
# names (what the trainer, the set writers and the stages write) that were not there when it started.
# Anything else in a stage folder (a user's notes) is never deleted.
STAGE_OUTPUTS = ("checkpoints", "samples", "tensorboard", "wandb", "pairs", "set", "metrics.jsonl", "config.yaml",
                 "train.log", "samples.png", "samples_*.png", ".selfflow-output.json", ".selfflow.lock",
                 MARKER, PENDING)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, as paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _record_written(folder: Path, before: set[str]) -> None:
    pending = read_marker(folder, PENDING)
    if pending is not None:
        with contextlib.suppress(OSError):
            write_json({**pending, "written": sorted(set(_files(folder)) - before - {PENDING})}, folder / PENDING)


def _written(folder: Path, marker: dict) -> set[str]:
    """The files of ``folder`` the stage wrote (``marker``: its finished or pending marker)."""
    if isinstance(marker.get("written"), list):
        return {str(name) for name in marker["written"]} | {MARKER, PENDING}
    before = set(marker.get("before", []))
    return {name for name in _files(folder) if name not in before
            and any(fnmatch.fnmatch(name.split("/")[0], pattern) for pattern in STAGE_OUTPUTS)}


def _clear(folder: Path, marker: dict, say: Callable[[str], None]) -> None:
    """Remove what the stage wrote (files, then the folders they leave empty); keep everything else."""
    written = _written(folder, marker)
    for name in sorted(written, reverse=True):
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():  # a marker edited by hand: never outside the folder
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
            for parent in path.parents:
                if parent == folder or any(parent.iterdir()):
                    break
                parent.rmdir()
    kept = _files(folder)
    if kept:
        say(f"[pipeline] {folder}: kept {', '.join(kept[:4])}{f' and {len(kept) - 4} more' if len(kept) > 4 else ''} "
            f"(not written by the stage)")


def _prepare(folder: Path, digest: str, done: dict | None, say: Callable[[str], None] = print) -> None:
    """Clear what a stage wrote with other settings; keep a stage interrupted with these (to resume) and
    every file the stage did not write."""
    pending = read_marker(folder, PENDING)
    if folder.exists():
        if done is None and pending is None:
            if not folder.is_dir() or any(folder.iterdir()):
                raise ConfigError(f"{folder}: in the way (not a stage folder of this pipeline); move it or choose another "
                                  f"pipeline.out_dir")
        elif done is not None or pending["hash"] != digest:
            _clear(folder, done if done is not None else pending, say)
    folder.mkdir(parents=True, exist_ok=True)
    if read_marker(folder, PENDING) is None:  # what is here now (kept files) is not the stage's
        write_json({"hash": digest, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "before": _files(folder)},
                   folder / PENDING)


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------
def _train_summary(run_config, result: dict) -> dict:
    t = run_config.train
    summary = {"status": result["status"], "steps": result["step"], "steps_planned": t.steps,
               "final_loss": result["last"].get("loss"), "method": run_config.method_name(), "batch_size": t.batch_size}
    if "positives" in result["last"]:  # contrastive encoders: positives per anchor in the last logged batch
        summary["positives_per_anchor"] = result["last"]["positives"]
    if result["status"] == "time_limit":
        summary["cut"] = (f"stopped at step {result['step']} of {t.steps} by train.time_limit_minutes="
                          f"{t.time_limit_minutes:g}")
    return summary


def _train(run_config) -> dict:
    from selfflow.trainer import train

    result = train(run_config)
    if result["status"] not in ("finished", "time_limit"):
        raise KeyboardInterrupt  # interrupted: the stage stays pending and resumes on the next run
    return _train_summary(run_config, result)


def _teacher(config: PipelineConfig, folder: Path, markers, device, say) -> dict:
    return _train(config.teacher)


def _student(config: PipelineConfig, folder: Path, markers, device, say) -> dict:
    s = config.student
    if s.kind == "teacher_sampler":
        sample = config.teacher.sample
        return {"status": "skipped", "kind": s.kind,
                "note": f"no student trained: the teacher's {sample.sampler} sampler ({sample.steps} steps) stands in"}
    out = {"kind": s.kind}
    if s.kind == "distill":
        from selfflow.loader import load_model
        from selfflow.sets import generate_set

        teacher = load_model(config.teacher.train.out_dir, "ema", device, expect="image")
        model, teacher_folder = teacher.model, teacher.folder
        say(f"[pipeline] student: {s.pairs} teacher pairs ({s.pairs_sampler}, {s.pairs_steps} steps)")
        t0 = time.perf_counter()
        generate_set(model, folder / "pairs", num=s.pairs, shard_size=s.pairs, kind="pairs", sampler=s.pairs_sampler,
                     steps=s.pairs_steps, cfg_scale=s.pairs_cfg_scale, batch_size=config.teacher.sample.batch_size,
                     device=device, source={"checkpoint": str(teacher_folder.resolve()), "weights": "ema"})
        out["pairs_seconds"] = round(time.perf_counter() - t0, 2)
        out["pairs"] = {"num": s.pairs, "sampler": s.pairs_sampler, "steps": s.pairs_steps, "cfg_scale": s.pairs_cfg_scale,
                        "seeds": [0, s.pairs - 1]}
    t0 = time.perf_counter()
    out.update(_train(s.run))
    out["train_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def generators(config: PipelineConfig) -> list[dict]:
    """The models the evaluate stage scores: name, folder and sampling settings."""
    t, s = config.teacher, config.student
    items = [{"name": "teacher", "folder": t.train.out_dir, "sampler": t.sample.sampler, "steps": t.sample.steps,
              "cfg_scale": t.sample.cfg_scale}]
    if s.run is not None:
        ss = s.run.sample
        items.append({"name": f"teacher, {ss.steps} Euler step{'s' if ss.steps > 1 else ''}", "folder": t.train.out_dir,
                      "sampler": "euler", "steps": ss.steps, "cfg_scale": t.sample.cfg_scale})
        items.append({"name": f"student ({s.kind})", "folder": s.run.train.out_dir, "sampler": ss.sampler, "steps": ss.steps,
                      "cfg_scale": ss.cfg_scale})
    return items


def _evaluate(config: PipelineConfig, folder: Path, markers, device, say) -> dict:
    from selfflow.data import load_dataset
    from selfflow.evaluation import FeatureStats, extract_features
    from selfflow.evaluation.feature_net import conditional_accuracy, train_feature_net
    from selfflow.imageio import save_grid
    from selfflow.loader import load_model
    from selfflow.sampling import generate

    e, data = config.evaluate, config.teacher.data
    train = load_dataset(data.name, path=data.path, split="train", image_size=data.image_size, channels=data.channels)
    test = load_dataset(data.name, path=data.path, split="test", image_size=data.image_size, channels=data.channels)
    x_train, y_train = train.get_batch(torch.arange(len(train)))
    x_test, y_test = test.get_batch(torch.arange(len(test)))
    say(f"[pipeline] evaluate: FD_dom classifier ({e.feature_net_steps} steps on {len(train)} real train images)")
    net = train_feature_net(x_train, y_train, train.num_classes, steps=e.feature_net_steps, seed=e.seed, device=device)
    real = FeatureStats.from_features(extract_features(net, x_test))
    floor = FeatureStats.from_features(extract_features(net, x_train[: len(x_test)])).frechet_distance(real)
    test_accuracy = float((net.predict(x_test) == y_test).float().mean())
    results = []
    for index, g in enumerate(generators(config)):
        model = load_model(g["folder"], "ema", device, expect="image").model
        classes = max(int(model.num_classes or 0), 1)
        n = e.num_samples
        labels = (torch.arange(n) // 10) % classes if model.num_classes else None
        seeds = list(range(e.seed, e.seed + n))
        samples = generate(model, num_samples=n, seeds=seeds, labels=labels, sampler=g["sampler"], steps=g["steps"],
                           cfg_scale=g["cfg_scale"], batch_size=config.teacher.sample.batch_size, device=device,
                           image_shape=(model.in_channels, model.image_size, model.image_size), progress=False)
        grid = save_grid(samples.images[: 10 * classes], folder / f"samples_{index}.png", nrow=10, upscale=8)
        row = {**{k: v for k, v in g.items() if k != "folder"}, "grid": grid.name, "num_samples": n, "seeds": [seeds[0], seeds[-1]],
               "nfe_per_sample": samples.nfe_per_sample, "wall_time_s": round(samples.wall_time_s, 3),
               "fd_dom": round(FeatureStats.from_features(extract_features(net, samples.images)).frechet_distance(real), 3)}
        if labels is not None:
            overall, _ = conditional_accuracy(net, samples.images, labels)
            row["class_accuracy"] = round(float(overall), 3)
        results.append(row)
        say(f"[pipeline] evaluate: {g['name']}: FD_dom {row['fd_dom']}, class accuracy {row.get('class_accuracy')}")
    return {"status": "finished", "generators": results, "fd_dom_floor": round(floor, 3), "test_images": len(test),
            "train_images": len(train), "feature_net": {"steps": e.feature_net_steps, "seed": e.seed, "test_accuracy": round(test_accuracy, 3)}}


def synth_source(config: PipelineConfig) -> tuple[str, str]:
    """(name, folder) of the model the synthetic set comes from."""
    if config.synth.generator == "student":
        return f"student ({config.student.kind})", config.student.run.train.out_dir
    return "teacher", config.teacher.train.out_dir


def _synth(config: PipelineConfig, folder: Path, markers, device, say) -> dict:
    from selfflow.config import sample_settings
    from selfflow.files import load_tensors
    from selfflow.imageio import save_grid, uint8_to_float
    from selfflow.loader import load_model
    from selfflow.represent.synth import make_synth_set

    s = config.synth
    name, source = synth_source(config)
    source_model = load_model(source, "ema", device, expect="image")
    model, model_folder = source_model.model, source_model.folder
    own = config.teacher.sample if s.generator == "teacher" else config.student.run.sample  # the pipeline's, not the checkpoint's
    settings = sample_settings(None, sampler=s.sampler or own.sampler, steps=s.steps or own.steps,
                               cfg_scale=own.cfg_scale if s.cfg_scale is None else s.cfg_scale, batch_size=own.batch_size,
                               num_classes=model.num_classes)
    paths: list[Path] = []
    t0 = time.perf_counter()
    make_synth_set(model, folder / "set", captions=s.captions, per_caption=s.per_caption, num=s.num, shard_size=s.num, seed=s.seed,
                   sampler=settings.sampler, steps=settings.steps, cfg_scale=settings.cfg_scale, churn=s.churn,
                   batch_size=settings.batch_size, device=device,
                   source={"checkpoint": str(model_folder.resolve()), "weights": "ema"}, on_shard=lambda i, p: paths.append(p))
    seconds = time.perf_counter() - t0
    shard = sorted((folder / "set").glob("shard_*.safetensors"))[0]
    images = load_tensors(shard)["images"][: 10 * s.per_caption]
    save_grid(uint8_to_float(images), folder / "samples.png", nrow=2 * s.per_caption, upscale=8)
    return {"status": "finished", "generator": name, "sampler": settings.sampler, "steps": settings.steps,
            "cfg_scale": settings.cfg_scale, "captions": s.captions, "per_caption": s.per_caption, "num": s.num, "seed": s.seed,
            "generate_seconds": round(seconds, 2), "grid": "samples.png"}


def _encoder(config: PipelineConfig, folder: Path, markers, device, say) -> dict:
    summary = _train(config.encoder)
    m = config.encoder.method
    summary.update({"encoder": m.encoder, "embed_dim": m.embed_dim, "temperature": m.temperature, "method": config.encoder.method_name()})
    return summary


def _probes(config: PipelineConfig, folder: Path, markers, device, say) -> dict:
    from selfflow.config import config_from_dict
    from selfflow.data import load_dataset
    from selfflow.represent.encoders import build_encoder
    from selfflow.represent.probes import load_encoder, raw_pixel_probes, run_probes

    p = config.probes
    encoder, _, run = load_encoder(config.encoder.train.out_dir, p.weights, device)
    train = load_dataset(p.data, path=p.path, split="train", image_size=encoder.image_size, channels=encoder.in_channels)
    test = load_dataset(p.data, path=p.path, split="test", image_size=encoder.image_size, channels=encoder.in_channels)
    result = {"status": "finished", "encoder": run_probes(encoder, train, test, p, device)}
    torch.manual_seed(config.encoder.train.seed)
    untrained = build_encoder(config_from_dict(run, "encoder")).to(device).eval().requires_grad_(False)
    result["untrained_encoder"] = run_probes(untrained, train, test, p, device)
    result["raw_pixels"] = raw_pixel_probes(train, test, p)
    return result


STAGE_FUNCTIONS = {"teacher": _teacher, "student": _student, "evaluate": _evaluate, "synth": _synth, "encoder": _encoder,
                   "probes": _probes}
