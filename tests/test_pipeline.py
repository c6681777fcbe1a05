"""selfflow pipeline: typed config, stage markers (skip finished, re-run changed and what reads them),
the report (valid HTML whose images exist), and a real tiny run through the command line."""
import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from selfflow.cli import main
from selfflow.config import ConfigError, load_pipeline_config
from selfflow import pipeline
from selfflow.quickstart import TINY_OVERRIDES, quickstart_config
from selfflow.report import svg_line_plot

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, *overrides):
    return quickstart_config(str(tmp_path / "p"), device="cpu", tiny=True, overrides=list(overrides))


# ---- config ----------------------------------------------------------------------------------
def test_the_yaml_config_is_the_quickstart():
    a = load_pipeline_config(ROOT / "configs" / "digits_pipeline.yaml", ["pipeline.out_dir=x"]).to_dict()
    assert a == quickstart_config("x").to_dict()


def test_the_pipeline_sets_out_dirs_device_and_the_teacher(tmp_path):
    c = _config(tmp_path)
    out = tmp_path / "p"
    assert c.teacher.train.out_dir == str(out / "teacher") and c.teacher.train.device == "cpu"
    assert c.student.run.train.init_from == str(out / "teacher") and c.student.run.data.path == str(out / "student" / "pairs")
    assert c.student.run.model == c.teacher.model  # the student is the teacher's architecture
    assert c.encoder.data.name == "synth" and c.encoder.data.path == str(out / "synth" / "set")
    assert c.probes.device == "cpu"
    dmd2 = _config(tmp_path, "student.kind=dmd2", "student.method={}")
    assert dmd2.student.run.method_name() == "dmd2" and dmd2.student.run.method.teacher == str(out / "teacher")
    assert dmd2.student.run.data.name == "digits"


@pytest.mark.parametrize("overrides, words", [
    (["teacher.train.steps=0"], ["teacher.train.steps"]),
    (["teacher.train.out_dir=elsewhere"], ["teacher.train.out_dir", "set by the pipeline"]),
    (["student.train.init_from=x"], ["student.train.init_from"]),
    (["encoder.data.path=x"], ["encoder.data"]),
    (["student.method.name=dmd"], ["student.method.name=dmd", "student.kind=distill"]),
    (["student.kind=bogus"], ["student.kind", "bogus"]),
    (["student.kind=teacher_sampler"], ["synth.generator=student"]),
    (["synth.num=41"], ["synth.num=41", "synth.per_caption"]),
    (["synth.num=8"], ["encoder.train.batch_size"]),
    (["student.pairs=8"], ["student.pairs=8"]),
    (["encoder.method.name=simclr"], ["encoder.method.name=simclr"]),
    (["teacher.method={name: distill}"], ["teacher.method.name=distill"]),
    (["probes.device=cpu"], ["probes.device"]),
    (["probes.data=mnist", "probes.path=x"], ["probes.data=mnist"]),
    (["pipeline.device=gpu"], ["pipeline.device", "gpu"]),
    (["bogus.key=1"], ["bogus"]),
])
def test_bad_settings_name_the_key(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, *overrides)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not (tmp_path / "p").exists()


def test_cli_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {out_dir: " + str(tmp_path / "p") + "}\nteacher:\n  train: {stpes: 3}\n")
    assert main(["pipeline", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "teacher.train.stpes" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_teacher_sampler_needs_no_student(tmp_path):
    c = _config(tmp_path, "student.kind=teacher_sampler", "synth.generator=teacher")
    assert c.student.run is None and [g["name"] for g in pipeline.generators(c)] == ["teacher"]
    assert pipeline.synth_source(c) == ("teacher", c.teacher.train.out_dir)


# ---- markers: skip, re-run, resume (stages replaced by recorders; no training) -----------------
@pytest.fixture
def fake_stages(monkeypatch):
    calls = []

    def make(stage):
        def run(config, folder, markers, device, say):
            calls.append(stage)
            (folder / "output.txt").write_text(stage)
            return {"status": "finished"}
        return run

    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {s: make(s) for s in pipeline.STAGES})
    import selfflow.pipeline_report

    monkeypatch.setattr(selfflow.pipeline_report, "write_report", lambda config, markers, *a: Path(config.pipeline.out_dir) / "r.html")
    return calls


def test_finished_stages_are_skipped_and_a_change_reruns_what_follows(tmp_path, fake_stages):
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    assert fake_stages == list(pipeline.STAGES)
    fake_stages.clear()
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    assert fake_stages == []  # everything finished: nothing runs
    pipeline.run_pipeline(_config(tmp_path, "pipeline.progress=true"), say=lambda m: None)
    assert fake_stages == []  # a progress bar changes no result
    pipeline.run_pipeline(_config(tmp_path, "encoder.train.steps=5"), say=lambda m: None)
    assert fake_stages == ["encoder", "probes"]
    fake_stages.clear()
    pipeline.run_pipeline(_config(tmp_path, "encoder.train.steps=5", "evaluate.num_samples=50"), say=lambda m: None)
    assert fake_stages == ["evaluate"]  # nothing reads the evaluation
    fake_stages.clear()
    pipeline.run_pipeline(_config(tmp_path, "encoder.train.steps=5", "evaluate.num_samples=50", "teacher.train.lr=1e-3"),
                          say=lambda m: None)
    assert fake_stages == list(pipeline.STAGES)  # the teacher changed: everything after it


def test_evaluation_only_settings_do_not_invalidate_training_stages(tmp_path, fake_stages):
    run = lambda *o: pipeline.run_pipeline(_config(tmp_path, *o), say=lambda m: None)  # noqa: E731
    run()
    fake_stages.clear()
    run("teacher.sample.steps=7")
    assert fake_stages == ["evaluate"]  # the synthetic set comes from the student: only the evaluation samples the teacher
    fake_stages.clear()
    run("teacher.sample.steps=7", "student.sample.cfg_scale=1.5", "evaluate.seed=3")
    assert fake_stages == ["evaluate", "synth", "encoder", "probes"]  # the student's sampling makes the set
    fake_stages.clear()
    run("teacher.sample.steps=7", "student.sample.cfg_scale=1.5", "evaluate.seed=3", "synth.generator=teacher")
    assert fake_stages == ["synth", "encoder", "probes"]
    fake_stages.clear()
    run("teacher.sample.steps=9", "student.sample.cfg_scale=1.5", "evaluate.seed=3", "synth.generator=teacher")
    assert fake_stages == ["evaluate", "synth", "encoder", "probes"]  # now the teacher samples the set: never retrained
    marker = json.loads((tmp_path / "p" / "teacher" / "stage.json").read_text())
    assert "sample" not in marker["settings"] and "time_limit_minutes" not in marker["settings"]["train"]


def test_a_stage_cut_by_its_time_limit_continues_under_a_larger_one(tmp_path, fake_stages, monkeypatch):
    seen = []

    def teacher(config, folder, markers, device, say):
        seen.append(sorted(p.name for p in folder.iterdir()))
        (folder / f"checkpoint_{len(seen)}").write_text("weights")
        limit = config.teacher.train.time_limit_minutes
        if limit < 5:
            return {"status": "time_limit", "steps": 3, "cut": f"stopped at step 3 of 4 by train.time_limit_minutes={limit:g}"}
        return {"status": "finished", "steps": 4}

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "teacher", teacher)
    messages = []
    run = lambda *o: pipeline.run_pipeline(_config(tmp_path, *o), say=messages.append)  # noqa: E731
    run("teacher.train.time_limit_minutes=2")
    marker = json.loads((tmp_path / "p" / "teacher" / "stage.json").read_text())
    assert marker["result"]["status"] == "time_limit" and marker["time_limit_minutes"] == 2
    fake_stages.clear()
    run("teacher.train.time_limit_minutes=2")  # the same limit: nothing more to do, and it says why
    assert len(seen) == 1 and fake_stages == []
    assert any("time_limit_minutes=2" in m and "raise it to continue" in m for m in messages)
    run("teacher.train.time_limit_minutes=1")  # a smaller one does not undo the work
    assert len(seen) == 1 and fake_stages == []
    run("teacher.train.time_limit_minutes=10")  # larger: the teacher goes on in its folder, and what reads it re-runs
    assert seen == [["stage.pending.json"], ["checkpoint_1", "stage.pending.json"]]
    assert fake_stages == ["student", "evaluate", "synth", "encoder", "probes"]
    marker = json.loads((tmp_path / "p" / "teacher" / "stage.json").read_text())
    assert marker["result"]["status"] == "finished" and marker["time_limit_minutes"] == 10
    fake_stages.clear()
    run("teacher.train.time_limit_minutes=20")  # finished: a limit changes nothing
    assert len(seen) == 2 and fake_stages == []


def test_a_copied_pipeline_folder_keeps_its_finished_stages(tmp_path, fake_stages):
    import shutil

    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    shutil.copytree(tmp_path / "p", tmp_path / "q")
    fake_stages.clear()
    config = quickstart_config(str(tmp_path / "q"), device="cpu", tiny=True)
    pipeline.run_pipeline(config, say=lambda m: None)
    assert fake_stages == [] and config.student.run.train.init_from == str(tmp_path / "q" / "teacher")


def test_a_changed_stage_removes_only_what_it_wrote(tmp_path, fake_stages, monkeypatch):
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    synth = tmp_path / "p" / "synth"
    (synth / "NOTES.txt").write_text("a user's notes")  # put there after the stage finished: not the stage's
    (synth / "mine").mkdir()
    (synth / "mine" / "plot.png").write_bytes(b"user")
    (tmp_path / "p" / "teacher" / "kept").write_text("unchanged stage")
    seen, messages = [], []
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "synth",
                        lambda c, folder, *a: seen.append(pipeline._files(folder)) or (folder / "new.txt").write_text("x") and {})
    pipeline.run_pipeline(_config(tmp_path, "synth.seed=3"), say=messages.append)
    assert seen == [["NOTES.txt", "mine/plot.png", "stage.pending.json"]]  # its old output.txt went, the user's files stayed
    assert (synth / "NOTES.txt").read_text() == "a user's notes" and (synth / "mine" / "plot.png").read_bytes() == b"user"
    assert (tmp_path / "p" / "teacher" / "kept").exists()
    assert any("kept NOTES.txt, mine/plot.png (not written by the stage)" in m for m in messages)
    marker = json.loads((synth / "stage.json").read_text())
    assert marker["settings"]["seed"] == 3 and marker["inputs"]["teacher"] == json.loads(
        (tmp_path / "p" / "teacher" / "stage.json").read_text())["hash"]
    assert marker["before"] == ["NOTES.txt", "mine/plot.png"] and marker["written"] == ["new.txt"]
    pipeline.run_pipeline(_config(tmp_path, "synth.seed=4"), say=lambda m: None)  # and again: still the user's
    assert pipeline._files(synth) == ["NOTES.txt", "mine/plot.png", "new.txt", "stage.json"] and len(seen) == 2


def _interrupt_synth(tmp_path, monkeypatch) -> Path:
    """Run the pipeline with a synth stage that writes a file and is interrupted; returns its folder."""
    def fail(config, folder, markers, device, say):
        (folder / "partial").write_text("half done")
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "synth", fail)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    return tmp_path / "p" / "synth"


def test_a_changed_interrupted_stage_removes_only_what_it_wrote(tmp_path, fake_stages, monkeypatch):
    synth = _interrupt_synth(tmp_path, monkeypatch)
    (synth / "NOTES.txt").write_text("a user's notes")
    seen = []
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "synth", lambda c, folder, *a: seen.append(pipeline._files(folder)) or {})
    pipeline.run_pipeline(_config(tmp_path, "synth.seed=3"), say=lambda m: None)
    assert seen == [["NOTES.txt", "stage.pending.json"]] and (synth / "NOTES.txt").read_text() == "a user's notes"


def test_after_a_hard_kill_a_changed_stage_removes_only_its_known_outputs(tmp_path, fake_stages):
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    teacher = tmp_path / "p" / "teacher"
    (teacher / "stage.json").unlink()  # as a kill -9 mid-training leaves it: a pending marker, no list of what was written
    pipeline.write_json({"hash": "old", "started": "then"}, teacher / "stage.pending.json")
    (teacher / "checkpoints" / "step_00000002").mkdir(parents=True)
    (teacher / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"w")
    (teacher / "metrics.jsonl").write_text("{}\n")
    (teacher / "NOTES.txt").write_text("a user's notes")
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    assert pipeline._files(teacher) == ["NOTES.txt", "output.txt", "stage.json"]
    assert (teacher / "NOTES.txt").read_text() == "a user's notes"


def test_a_marker_naming_files_outside_its_folder_deletes_nothing_there(tmp_path, fake_stages):
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    outside = tmp_path / "thesis.txt"
    outside.write_text("chapter 1")
    marker = json.loads((tmp_path / "p" / "synth" / "stage.json").read_text())
    pipeline.write_json({**marker, "written": ["../../thesis.txt", "output.txt"]}, tmp_path / "p" / "synth" / "stage.json")
    pipeline.run_pipeline(_config(tmp_path, "synth.seed=3"), say=lambda m: None)
    assert outside.read_text() == "chapter 1"

def test_an_interrupted_stage_resumes_in_its_folder(tmp_path, fake_stages, monkeypatch):
    synth = _interrupt_synth(tmp_path, monkeypatch)
    assert (synth / "stage.pending.json").exists() and not (synth / "stage.json").exists()
    seen = []
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "synth", lambda c, folder, *a: seen.append((folder / "partial").exists()) or {})
    fake_stages.clear()
    pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    assert seen == [True] and fake_stages == ["encoder", "probes"]  # same settings: its work is kept
    assert not (synth / "stage.pending.json").exists()


def test_a_foreign_folder_in_the_way_is_refused(tmp_path, fake_stages):
    (tmp_path / "p" / "teacher").mkdir(parents=True)
    (tmp_path / "p" / "teacher" / "mine.txt").write_text("someone's files")
    with pytest.raises(ConfigError, match=r"p: holds teacher \(not written by selfflow\)"):
        pipeline.run_pipeline(_config(tmp_path), say=lambda m: None)
    assert (tmp_path / "p" / "teacher" / "mine.txt").exists()


# ---- the report -------------------------------------------------------------------------------
class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def check_report(html_path: Path) -> list[str]:
    """Parse the report; every tag closed in order; returns the image sources (each must exist)."""
    checker = _Checker()
    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    for src in checker.images:
        assert (html_path.parent / src).is_file(), src
        if src.endswith(".svg"):
            ET.parse(html_path.parent / src)  # well-formed XML
    return checker.images


def test_svg_plot_is_xml_with_one_line_per_series():
    svg = svg_line_plot({"a": ([0, 1, 2], [3.0, 2.0, float("nan")]), "b": ([0, 2], [1.0, 0.5]), "empty": ([], [])},
                        title="t <&>", xlabel="step", ylabel="loss")
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
    assert "no data" in svg_line_plot({}, title="t", xlabel="x", ylabel="y")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The pipeline command on the YAML config with tiny settings (every stage real)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    argv = ["pipeline", "--config", str(ROOT / "configs" / "digits_pipeline.yaml"), "--set", f"pipeline.out_dir={out}",
            "--set", "pipeline.device=cpu", "--set", "pipeline.progress=false"]
    for item in TINY_OVERRIDES:
        argv += ["--set", item]
    assert main(argv) == 0
    return out, argv


def test_the_report_is_valid_html_whose_images_exist(tiny_run):
    out, _ = tiny_run
    images = check_report(out / "report.html")
    assert "samples.png" in images and any(i.startswith("figures/loss_teacher") for i in images)
    assert any(i.startswith("figures/loss_encoder") for i in images) and "synth/samples.png" in images
    md = (out / "report.md").read_text()
    assert "| StableRep encoder (synthetic images only) |" in md and "## Time per stage" in md
    record = json.loads((out / "report.json").read_text())
    assert list(record["stages"]) == list(pipeline.STAGES) and all(s["ran"] for s in record["stages"].values())
    probes = record["stages"]["probes"]["result"]
    assert 0 <= probes["encoder"]["linear"] <= 1 and set(probes["encoder"]["few_shot"]) == {"1", "5", "10"}
    ev = record["stages"]["evaluate"]["result"]
    assert [g["nfe_per_sample"] for g in ev["generators"]] == [4, 1, 1]  # heun 2 steps; teacher 1 Euler step; student
    assert record["stages"]["synth"]["result"]["generator"] == "student (distill)"


def test_a_real_rerun_reuses_stages_and_reruns_a_changed_one(tiny_run, capsys):
    out, argv = tiny_run
    before = {s: (out / s / "stage.json").stat().st_mtime_ns for s in pipeline.STAGES}
    capsys.readouterr()
    assert main(argv + ["--set", "probes.max_iter=30"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 5 and "probes: running" in printed
    after = {s: (out / s / "stage.json").stat().st_mtime_ns for s in pipeline.STAGES}
    assert [s for s in pipeline.STAGES if before[s] != after[s]] == ["probes"]
    record = json.loads((out / "report.json").read_text())
    assert [s for s, v in record["stages"].items() if v["ran"]] == ["probes"]
    check_report(out / "report.html")
