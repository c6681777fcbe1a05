"""The pipeline's report: ``report.html``, its Markdown twin ``report.md`` and ``report.json``.

Built from the stage markers (``<stage>/stage.json``) and the runs' ``metrics.jsonl``: sample grids
(teacher, student, synthetic set), loss curves (SVG, no plotting library needed), the probe table,
each stage's time, and the protocol of every number (counts, seeds, sampler, steps).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from selfflow.config import PipelineConfig
from selfflow.files import write_json
from selfflow.report import Report, machine, svg_line_plot, write_text


def read_metrics(run_dir: str | Path) -> list[dict]:
    rows = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _loss_plot(run_dir: str | Path, title: str, path: Path) -> Path | None:
    rows = [r for r in read_metrics(run_dir) if isinstance(r.get("step"), (int, float))]
    keys = sorted({k for r in rows for k, v in r.items() if k.startswith("loss") and isinstance(v, (int, float))})
    if not rows or not keys:
        return None
    series = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}
    write_text(path, svg_line_plot(series, title=title, xlabel="training step", ylabel="loss"))
    return path


def _command() -> str:
    """The command line that ran the pipeline (``selfflow ...``), or a note when Python called it."""
    argv = list(sys.argv) or [""]
    if Path(argv[0]).name in ("selfflow", "__main__.py"):
        return " ".join(["selfflow", *argv[1:]])
    return f"run_pipeline() called from {Path(argv[0]).name or 'Python'}"


def positives_in_words(config, encoder: dict, real_train_images) -> str:
    """What defined the encoder's positives, and what real data its generator saw, in words."""
    sy, t = config.synth, config.teacher
    m = sy.per_caption
    k = getattr(config.encoder.method, "images_per_caption", 0) or m
    measured = encoder.get("positives_per_anchor")
    seen = f" (measured in the last logged batch: {measured:g} per anchor)" if measured is not None else ""
    if config.encoder.method_name() == "supcon":
        words = (f"Positives: every image of the anchor's class in the batch — supervised contrastive learning (supcon): the "
                 f"class labels define the positives{seen}. Compare it with supervised training, not with SimCLR.")
    else:
        row = ("independent draws of one class label, each from its own noise seed" if sy.captions == "classes" else
               "SDE variations of one shared initial noise (an augmentation of one image)")
        drawn = f"{k} of them drawn per row and batch, " if k < m else ""
        words = (f"Positives: the images of one caption row — a row's {m} images are {row}; {drawn}so {k - 1} positives per "
                 f"anchor{seen}. Every other row is a negative, rows of the same class included: no label defines a positive.")
    images = f"{real_train_images} " if real_train_images else ""
    labels = "with their class labels as its condition" if t.data.class_conditional else "without labels"
    return (f"{words} What the generator saw: the teacher was trained on the {images}real {t.data.name} train images "
            f"{labels}; the synthetic set comes from it{' through the student' if sy.generator == 'student' else ''}. "
            f"The encoder itself sees no real image and no label until the probes.")


def _selection(result: dict) -> str:
    """How the linear probe's L2 strength was chosen, in words."""
    chosen = result.get("linear_selection") or {}
    if not chosen:
        return "not recorded"
    return (f"λ = {chosen['weight_decay']:g}, {chosen['iterations']} iterations"
            f"{'' if chosen.get('converged') else ' (not converged)'}")


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _stage_row(stage: str, marker: dict, ran: bool) -> list:
    result = marker.get("result", {})
    note = result.get("cut") or result.get("note") or ""
    return [stage, "ran now" if ran else f"reused (finished {marker.get('finished', '?')})", f"{marker.get('seconds', 0):.1f}",
            result.get("status", ""), note]


def write_report(config: PipelineConfig, markers: dict[str, dict], ran: dict[str, bool], device, seconds: float) -> Path:
    STAGES = list(markers)  # the run order
    out = Path(config.pipeline.out_dir)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    r = {stage: markers[stage]["result"] for stage in STAGES}
    info = machine()
    t, st = config.teacher, config.student
    report = Report("selfflow pipeline report")
    report.paragraph(
        f"Real data ({t.data.name}) → {t.method_name()} teacher → "
        f"{'one-step student (' + st.kind + ')' if st.run is not None else 'no student (the teacher sampler)'} → "
        f"synthetic set ({config.synth.num} images) → {'SupCon' if config.encoder.method_name() == 'supcon' else 'StableRep'} "
        f"encoder → probes on the real {config.probes.data}. "
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; this run took {seconds:.0f} s "
        f"({sum(ran.values())} of {len(STAGES)} stages ran, the rest were reused).")
    report.paragraph(f"Command: {_command()} · Machine: {info['cpu']}, "
                     f"{info['cores']} cores, torch {info['torch']} with {info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''}, device {device}"
                     + (f", load average {info['load_average'][0]:.2f}" if "load_average" in info else "") + ".")
    cut = [f"{stage}: {markers[stage]['result']['cut']}" for stage in STAGES if markers[stage]["result"].get("cut")]
    if cut:
        report.paragraph("Cut short by a time limit (the later stages used what was there): " + "; ".join(cut) + ".")

    # ---- headline numbers ---------------------------------------------------------------------
    ev = r["evaluate"]
    teacher_eval = ev["generators"][0]
    student_eval = ev["generators"][-1] if st.run is not None else None
    probes = r["probes"]
    headline = [["teacher FD_dom (real test floor)", f"{teacher_eval['fd_dom']} ({ev['fd_dom_floor']})"],
                ["teacher class accuracy", _pct(teacher_eval.get("class_accuracy"))]]
    if student_eval:
        headline += [["student FD_dom", student_eval["fd_dom"]], ["student class accuracy", _pct(student_eval.get("class_accuracy"))]]
    headline += [["encoder linear probe (raw pixels)", f"{_pct(probes['encoder']['linear'])} ({_pct(probes['raw_pixels']['linear'])})"],
                 ["encoder k-NN", _pct(probes["encoder"]["knn"])]]
    report.heading("Results")
    report.table(["measure", "value"], headline)

    # ---- teacher ------------------------------------------------------------------------------
    teacher = r["teacher"]
    report.heading("1. Teacher")
    report.paragraph(
        f"{t.method_name()} on {t.data.name} ({t.data.split} split), DiT depth {t.model.resolved_dims()[0]}, width "
        f"{t.model.resolved_dims()[1]}, patch {t.model.patch_size}; {teacher['steps']} of {teacher['steps_planned']} steps at "
        f"batch {t.train.batch_size}, lr {t.train.lr:g}, seed {t.train.seed}; final loss "
        f"{teacher['final_loss']:.4f}; status {teacher['status']}." if teacher.get("final_loss") is not None else
        f"{t.method_name()}: {teacher['steps']} steps, status {teacher['status']}.")
    shutil.copyfile(out / "evaluate" / teacher_eval["grid"], out / "samples.png")
    report.image("samples.png", f"Teacher samples: one row per class, EMA weights, {teacher_eval['sampler']} sampler, "
                                f"{teacher_eval['steps']} steps ({teacher_eval['nfe_per_sample']:g} network evaluations per image), "
                                f"seeds {teacher_eval['seeds'][0]}..{teacher_eval['seeds'][0] + 99}.")
    plot = _loss_plot(t.train.out_dir, "teacher training loss", figures / "loss_teacher.svg")
    if plot:
        report.image(f"figures/{plot.name}", "Teacher loss (logged every train.log_every steps; loss = loss_fm + γ·loss_rep).")

    # ---- student ------------------------------------------------------------------------------
    student = r["student"]
    report.heading("2. One-step student")
    if st.run is None:
        report.paragraph(student["note"] + ".")
    else:
        text = (f"{st.kind}: {student['steps']} of {student['steps_planned']} steps at batch {st.run.train.batch_size}, lr "
                f"{st.run.train.lr:g}, from the teacher's EMA weights; status {student['status']}.")
        if "pairs" in student:
            pairs = student["pairs"]
            text += (f" Trained on {pairs['num']} teacher (noise, image) pairs ({pairs['sampler']}, {pairs['steps']} steps, "
                     f"guidance {pairs['cfg_scale']:g}, seeds {pairs['seeds'][0]}..{pairs['seeds'][1]}; generated in "
                     f"{student['pairs_seconds']:.1f} s).")
        report.paragraph(text)
        report.image(f"evaluate/{student_eval['grid']}",
                     f"Student samples: the same seeds and classes as the teacher's grid, {student_eval['nfe_per_sample']:g} "
                     f"network evaluation(s) per image.")
        if len(ev["generators"]) > 2:
            ref = ev["generators"][1]
            report.image(f"evaluate/{ref['grid']}", f"The teacher itself at {ref['steps']} Euler step(s), same seeds: what the student improves on.")
        plot = _loss_plot(st.run.train.out_dir, "student training loss", figures / "loss_student.svg")
        if plot:
            report.image(f"figures/{plot.name}", "Student loss.")

    # ---- evaluation ---------------------------------------------------------------------------
    report.heading("3. Sample quality")
    rows = [[g["name"], g["sampler"], g["steps"], f"{g['nfe_per_sample']:g}", g["fd_dom"], _pct(g.get("class_accuracy")),
             f"{1000 * g['wall_time_s'] / g['num_samples']:.2f}"] for g in ev["generators"]]
    rows.append(["real train images (floor)", "", "", "", ev["fd_dom_floor"], "", ""])
    report.table(["model", "sampler", "steps", "evaluations / image", "FD_dom ↓", "class accuracy", "ms / image"], rows)
    report.paragraph(
        f"Protocol: {teacher_eval['num_samples']} images per model, image k from seed {teacher_eval['seeds'][0]} + k with class "
        f"(k // 10) mod classes, EMA weights. FD_dom: Fréchet distance in the features of a small digit classifier trained "
        f"for {ev['feature_net']['steps']} steps (seed {ev['feature_net']['seed']}) on the {ev['train_images']} real train "
        f"images (test accuracy {_pct(ev['feature_net']['test_accuracy'])}), against the {ev['test_images']} real test images; "
        f"the floor is real train images (as many as the test split) against the same test images. Class accuracy: how often "
        f"that classifier reads a sample as the class it was drawn for. Time per image: one batch on {device}, this machine.")

    # ---- synthetic set ------------------------------------------------------------------------
    sy = r["synth"]
    report.heading("4. Synthetic set")
    report.paragraph(
        f"{sy['num']} images from the {sy['generator']} ({sy['sampler']}, {sy['steps']} step(s), guidance {sy['cfg_scale']:g}), "
        f"{sy['per_caption']} per caption, captions: {sy['captions']}; image k from seed {sy['seed']} + k; generated in "
        f"{sy['generate_seconds']:.1f} s.")
    report.image(f"synth/{sy['grid']}", f"The first 10 captions of the set, {sy['per_caption']} images each, in order.")

    # ---- encoder ------------------------------------------------------------------------------
    en, e = r["encoder"], config.encoder
    report.heading("5. StableRep encoder")
    shape = (f"widths {e.method.width}/{2 * e.method.width}/{4 * e.method.width}, stem stride {e.method.stem_stride}"
             if en["encoder"] == "resnet" else
             f"depth {e.model.resolved_dims()[0]}, width {e.model.resolved_dims()[1]}, patch {e.model.patch_size}")
    report.paragraph(
        f"A {en['encoder']} encoder ({shape}) trained with the multi-positive contrastive loss (τ = {en['temperature']:g}, embedding "
        f"{en['embed_dim']}) on the synthetic set: {en['steps']} of {en['steps_planned']} steps of {e.train.batch_size} captions × "
        f"{sy['per_caption']} images, lr {e.train.lr:g}, seed {e.train.seed}; status {en['status']}.")
    report.paragraph(positives_in_words(config, en, r["evaluate"].get("train_images")))
    plot = _loss_plot(e.train.out_dir, "encoder training loss", figures / "loss_encoder.svg")
    if plot:
        report.image(f"figures/{plot.name}", "Encoder loss (multi-positive cross-entropy).")

    # ---- probes -------------------------------------------------------------------------------
    p = config.probes
    report.heading("6. Probes on the real data")
    shots = [str(k) for k in p.few_shot]
    rows = []
    for name, key in (("StableRep encoder (synthetic images only)", "encoder"), ("untrained encoder, same architecture", "untrained_encoder"),
                      ("raw pixels", "raw_pixels")):
        res = probes[key]
        few = [(_pct(res["few_shot"][k]["mean"]) + f" ± {100 * res['few_shot'][k]['std']:.1f}") if "few_shot" in res else "" for k in shots]
        rows.append([name, _pct(res["linear"]), _pct(res["knn"]), *few])
    report.table(["features", "linear probe", "k-NN", *[f"{k}-shot" for k in shots]], rows)
    report.paragraph(
        f"Protocol: the frozen encoder's features (before the head, no augmentation) of the {probes['encoder']['train_images']} "
        f"real train and {probes['encoder']['test_images']} real test images of {p.data}; accuracy on the test images. Linear: "
        f"logistic regression on standardised features, L-BFGS to convergence (at most {p.max_iter} iterations), its L2 "
        f"strength chosen from {list(p.weight_decays)} on {p.holdout:.0%} of the train images held out (the test images "
        f"take no part): {_selection(probes['encoder'])} for the encoder. k-NN: k = {p.knn_k}, "
        f"cosine, τ = {p.knn_temperature:g}. Few-shot: the linear probe on k labelled train images per class, {p.few_shot_trials} "
        f"random draws (seed {p.seed}), mean ± spread. One test image is {100 / probes['encoder']['test_images']:.2f} points.")

    # ---- time ---------------------------------------------------------------------------------
    report.heading("Time per stage")
    report.table(["stage", "this run", "seconds", "status", "note"], [_stage_row(s, markers[s], ran[s]) for s in STAGES])
    report.paragraph(
        f"Stage folders under {out}: each holds stage.json (its settings, the hash of settings and inputs, its result). "
        f"Running the same command again reuses every finished stage; changing a setting re-runs that stage and the ones "
        f"that read it. The resolved settings: pipeline.json.")

    record = {"stages": {s: {"seconds": markers[s]["seconds"], "ran": ran[s], "hash": markers[s]["hash"], "result": markers[s]["result"]}
                         for s in STAGES},
              "seconds": round(seconds, 1), "machine": info, "device": str(device), "command": _command()}
    write_json(record, out / "report.json")
    html, _ = report.write(out)
    return html
