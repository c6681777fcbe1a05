"""The command line as a user meets it: exit codes, one-line errors, files written."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfflow.cli import main


def test_help_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "selfflow", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


def test_unknown_config_key_fails_before_training(tmp_path, capsys):
    code = main(["train", "--set", "train.stpes=3", "--set", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "train.stpes" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_data_path_is_one_line(tmp_path, capsys):
    code = main(["train", "--set", "data.name=mnist", "--set", f"data.path={tmp_path / 'missing'}", "--set", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("selfflow: error:") and "missing" in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "--set", "model.depth=2", "--set", "model.hidden_size=64", "--set", "train.steps=3",
            "--set", "train.batch_size=16", "--set", f"train.out_dir={out}", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "train.num_sample_images=4", "--set", "sample.steps=2",
            "--set", "train.device=cpu"]
    assert main(args) == 0
    return out


def test_train_writes_the_run_folder(trained_run):
    assert (trained_run / "samples" / "step_0000003.png").is_file()
    assert (trained_run / "checkpoints" / "step_0000003" / "ema.safetensors").is_file()
    assert (trained_run / "config.yaml").is_file()


def test_sample_writes_grid_npz_and_record(trained_run, tmp_path):
    out = tmp_path / "samples"
    code = main(["sample", "--ckpt", str(trained_run), "--n", "5", "--out", str(out), "--steps", "3", "--sampler", "heun",
                 "--labels", "1,2", "--device", "cpu"])
    assert code == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (5, 1, 8, 8) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 2, 1, 2, 1]
    record = json.loads((out / "samples.json").read_text())
    assert record["nfe_per_sample"] == 6 and record["sampler"] == "heun"


def test_sample_takes_the_run_settings_and_a_precision(trained_run, tmp_path):
    """No sampling flag: the run's own sample section (steps 2, euler); --precision bf16 runs the
    network under bf16 autocast (tests/test_sampling.py checks that it does), is recorded, and stays
    within bf16 rounding of the fp32 pixels."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["sample", "--ckpt", str(trained_run), "--n", "4", "--out", str(out), "--device", "cpu",
                     "--precision", precision]) == 0
        record = json.loads((out / "samples.json").read_text())
        assert (record["sampler"], record["steps"], record["precision"]) == ("euler", 2, precision)
        runs[precision] = np.load(out / "samples.npz")["images"].astype(int)
    assert np.abs(runs["fp32"] - runs["bf16"]).max() <= 16


def test_sample_rejects_bad_labels(trained_run, tmp_path, capsys):
    code = main(["sample", "--ckpt", str(trained_run), "--n", "2", "--out", str(tmp_path), "--labels", "12", "--device", "cpu"])
    assert code == 2 and "outside 0..9" in capsys.readouterr().err


def test_export_leaves_out_training_state(trained_run, tmp_path):
    assert main(["export", "--ckpt", str(trained_run), "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert main(["sample", "--ckpt", str(tmp_path / "gen"), "--n", "2", "--out", str(tmp_path / "s"), "--steps", "2", "--device", "cpu"]) == 0


def test_truncated_checkpoint_is_a_clear_error(trained_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "checkpoints" / "step_0000003", broken)
    data = (broken / "ema.safetensors").read_bytes()
    (broken / "ema.safetensors").write_bytes(data[: len(data) // 3])
    code = main(["sample", "--ckpt", str(broken), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "ema.safetensors" in err and "truncated or corrupt" in err


def test_quickstart_writes_grid_and_report(tmp_path, capsys):
    # --tiny: every pipeline stage a few steps (the full quickstart: docs/benchmarks/quickstart.md)
    assert main(["quickstart", "--tiny", "--steps", "3", "--out", str(tmp_path / "qs"), "--device", "cpu"]) == 0
    assert f"report: {tmp_path / 'qs' / 'report.html'}" in capsys.readouterr().out
    record = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert (tmp_path / "qs" / "samples.png").is_file() and (tmp_path / "qs" / "report.md").is_file()
    teacher = record["stages"]["teacher"]["result"]
    assert teacher["steps"] == 3 and teacher["status"] == "finished" and teacher["method"] == "self_flow"
    evaluation = record["stages"]["evaluate"]["result"]
    assert evaluation["fd_dom_floor"] >= 0 and 0 <= evaluation["generators"][0]["class_accuracy"] <= 1
    assert 0 <= record["stages"]["probes"]["result"]["encoder"]["linear"] <= 1


def test_eval_reports_every_protocol_field(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--ckpt", str(trained_run), "--n", "40", "--steps", "2", "--metrics", "fd_dom,pr,acc",
                 "--split", "test", "--train-steps", "10", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                 "--batch-size", "20", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["num_generated"] == 40 and report["reference"]["name"] == "digits" and report["reference"]["split"] == "test"
    assert report["fd_dom"] >= 0 and 0 <= report["precision"] <= 1 and 0 <= report["accuracy"] <= 1
    assert report["sampling"]["nfe_per_sample"] == 2 and report["sampling"]["seeds"] == [0, 39]
    assert report["feature_net"]["path"].startswith(str(tmp_path / "cache"))
    assert "fd_dom" in capsys.readouterr().out


def test_eval_rejects_unknown_metric(trained_run, capsys):
    assert main(["eval", "--ckpt", str(trained_run), "--metrics", "fid,is"]) == 2
    assert "unknown ['is']" in capsys.readouterr().err


# ---- every command, fed bad paths, bad files and bad values -----------------------------------
# Each case: (command line with placeholders, words the one error line must hold). Placeholders:
# {run} a trained run, {missing} a path that does not exist, {text} a text file, {garbage} a
# checkpoint folder whose config.json is not JSON, {truncated} a checkpoint whose safetensors files
# are cut short, {file} an existing regular file (where a folder is wanted), {tmp} a scratch folder.
# Every one must exit 2 with exactly one line on stderr, no traceback, and write nothing new.
SAMPLING_COMMANDS = {
    "sample": ["sample", "--n", "2", "--out", "{tmp}/out", "--device", "cpu"],
    "generate-set": ["generate-set", "--n", "2", "--out", "{tmp}/out", "--device", "cpu"],
    "eval": ["eval", "--n", "4", "--out", "{tmp}/out/eval.json", "--device", "cpu", "--cache-dir", "{tmp}/cache",
             "--train-steps", "2"],
}
CHECKPOINT_CASES = [("{missing}", ["missing"]), ("{text}", ["notes.txt"]), ("{garbage}", ["config.json"]),
                    ("{truncated}", ["safetensors", "truncated or corrupt"])]
VALUE_CASES = [(["--steps", "0"], ["--steps", "0"]), (["--sampler", "eulr"], ["--sampler", "eulr"]),
               (["--cfg-scale", "-1"], ["--cfg-scale", "-1"]), (["--batch-size", "0"], ["--batch-size", "0"]),
               (["--device", "gpu"], ["gpu"]), (["--device", "cuda:x"], ["cuda:x"])]
BAD_CALLS = []
for _name, _base in SAMPLING_COMMANDS.items():
    BAD_CALLS += [(f"{_name} --ckpt {c}", [*_base, "--ckpt", c], words) for c, words in CHECKPOINT_CASES]
    BAD_CALLS += [(f"{_name} {' '.join(v)}", [*_base, "--ckpt", "{run}", *v], words) for v, words in VALUE_CASES]
    _n = _base.index("--n")
    BAD_CALLS += [(f"{_name} --n -3", [*_base[:_n], "--n", "-3", *_base[_n + 2:], "--ckpt", "{run}"], ["--n", "-3"])]
for _name in ("sample", "generate-set"):
    _base = SAMPLING_COMMANDS[_name]
    BAD_CALLS += [
        (f"{_name} --labels a,b", [*_base, "--ckpt", "{run}", "--labels", "a,b"], ["--labels", "a,b"]),
        (f"{_name} --labels 12", [*_base, "--ckpt", "{run}", "--labels", "12"], ["--labels", "12"]),
        (f"{_name} --labels ''", [*_base, "--ckpt", "{run}", "--labels", ","], ["--labels"]),
        (f"{_name} --out a file", [_name, "--n", "2", "--out", "{file}", "--device", "cpu", "--ckpt", "{run}"], ["{file}"]),
    ]
BAD_CALLS += [
    ("sample --autoencoder on a pixel model", [*SAMPLING_COMMANDS["sample"], "--ckpt", "{run}", "--autoencoder", "{missing}"], ["--autoencoder"]),
    ("generate-set --shard-size 0", [*SAMPLING_COMMANDS["generate-set"], "--ckpt", "{run}", "--shard-size", "0"], ["--shard-size"]),
    ("train --config missing", ["train", "--config", "{missing}", "--set", "train.out_dir={tmp}/out"], ["missing"]),
    ("train --config a binary file", ["train", "--config", "{binary}", "--set", "train.out_dir={tmp}/out"], ["blob.bin"]),
    ("train --config a folder", ["train", "--config", "{tmp}", "--set", "train.out_dir={tmp}/out"], ["config file not found"]),
    ("train --set without =", ["train", "--set", "train.steps", "--set", "train.out_dir={tmp}/out"], ["train.steps"]),
    ("train --set data.path missing", ["train", "--set", "data.name=npz", "--set", "data.path={missing}",
                                       "--set", "train.out_dir={tmp}/out"], ["missing"]),
    ("train out_dir is a file", ["train", "--set", "train.out_dir={file}", "--set", "model.depth=2",
                                 "--set", "train.device=cpu"], ["train.out_dir"]),
    ("distill --config missing", ["distill", "reflow", "--config", "{missing}", "--set", "train.out_dir={tmp}/out"], ["missing"]),
    ("distill unknown kind", ["distill", "consistency", "--config", "{configs}/digits_distill.yaml"], ["consistency"]),
    ("distill of another method", ["distill", "reflow", "--config", "{configs}/digits_flow_matching.yaml",
                                   "--set", "train.out_dir={tmp}/out"], ["method.name=flow_matching", "reflow"]),
    ("distill --set method.loss bogus", ["distill", "one-step", "--config", "{configs}/digits_distill.yaml",
                                         "--set", "method.loss=l3", "--set", "train.out_dir={tmp}/out"], ["method.loss", "l3"]),
    ("distill pairs missing", ["distill", "one-step", "--config", "{configs}/digits_distill.yaml", "--set", "data.path={missing}",
                               "--set", "train.out_dir={tmp}/out"], ["missing"]),
    ("distill pairs a text file", ["distill", "one-step", "--config", "{configs}/digits_distill.yaml", "--set", "data.path={text}",
                                   "--set", "train.out_dir={tmp}/out"], ["notes.txt"]),
    ("export --ckpt missing", ["export", "--ckpt", "{missing}", "--out", "{tmp}/out"], ["missing"]),
    ("export --ckpt text", ["export", "--ckpt", "{text}", "--out", "{tmp}/out"], ["notes.txt"]),
    ("export --ckpt garbage", ["export", "--ckpt", "{garbage}", "--out", "{tmp}/out"], ["config.json"]),
    ("export --ckpt truncated", ["export", "--ckpt", "{truncated}", "--out", "{tmp}/out"], ["truncated or corrupt"]),
    ("export --out a file", ["export", "--ckpt", "{run}", "--out", "{file}"], ["{file}"]),
    ("encode-latents --autoencoder missing", ["encode-latents", "--data", "digits", "--autoencoder", "{missing}",
                                              "--out", "{tmp}/out"], ["missing"]),
    ("encode-latents --autoencoder text", ["encode-latents", "--data", "digits", "--autoencoder", "{text}",
                                           "--out", "{tmp}/out"], ["notes.txt"]),
    ("encode-latents --autoencoder garbage", ["encode-latents", "--data", "digits", "--autoencoder", "{garbage}",
                                              "--out", "{tmp}/out"], ["config.json"]),
    ("encode-latents --data bogus", ["encode-latents", "--data", "bogus", "--autoencoder", "{garbage}", "--out", "{tmp}/out"], ["bogus"]),
    ("encode-latents --data-path missing", ["encode-latents", "--data", "npz", "--data-path", "{missing}",
                                            "--autoencoder", "{garbage}", "--out", "{tmp}/out"], ["missing"]),
    ("encode-latents --split bogus", ["encode-latents", "--data", "digits", "--split", "bogus", "--autoencoder", "{garbage}",
                                      "--out", "{tmp}/out"], ["bogus"]),
    ("encode-latents --shard-size 0", ["encode-latents", "--data", "digits", "--shard-size", "0", "--autoencoder", "{garbage}",
                                       "--out", "{tmp}/out"], ["--shard-size"]),
    ("encode-latents --batch-size -1", ["encode-latents", "--data", "digits", "--batch-size", "-1", "--autoencoder", "{garbage}",
                                        "--out", "{tmp}/out"], ["--batch-size"]),
    ("encode-latents --image-size 0", ["encode-latents", "--data", "digits", "--image-size", "0", "--autoencoder", "{garbage}",
                                       "--out", "{tmp}/out"], ["--image-size"]),
    ("encode-latents --channels 2", ["encode-latents", "--data", "digits", "--channels", "2", "--autoencoder", "{garbage}",
                                     "--out", "{tmp}/out"], ["--channels"]),
    ("quickstart --steps 0", ["quickstart", "--steps", "0", "--out", "{tmp}/out", "--device", "cpu"], ["--steps"]),
    ("quickstart --steps -2", ["quickstart", "--steps", "-2", "--out", "{tmp}/out", "--device", "cpu"], ["--steps"]),
    ("quickstart --device gpu", ["quickstart", "--device", "gpu", "--out", "{tmp}/out"], ["gpu"]),
    ("quickstart --out a file", ["quickstart", "--steps", "1", "--out", "{file}", "--device", "cpu"], ["{file}"]),
    ("data fetch unknown", ["data", "fetch", "cifar", "--to", "{tmp}/out"], ["cifar"]),
    ("data fetch --to a file", ["data", "fetch", "mnist", "--to", "{file}", "--base-url", "http://127.0.0.1:9/"], ["{file}"]),
    ("eval --metrics bogus", ["eval", "--ckpt", "{run}", "--metrics", "fid,bogus", "--out", "{tmp}/out/e.json"], ["bogus"]),
    ("eval --samples missing", ["eval", "--samples", "{missing}", "--data", "digits", "--out", "{tmp}/out/e.json"], ["missing"]),
    ("eval --samples text", ["eval", "--samples", "{text}", "--data", "digits", "--out", "{tmp}/out/e.json"], ["notes.txt"]),
    ("eval --data bogus", ["eval", "--samples", "{samples}", "--data", "bogus", "--out", "{tmp}/out/e.json"], ["bogus"]),
    ("eval --split bogus", ["eval", "--samples", "{samples}", "--data", "digits", "--split", "bogus",
                            "--out", "{tmp}/out/e.json"], ["bogus"]),
    ("eval --feature-net missing", ["eval", "--samples", "{samples}", "--data", "digits", "--metrics", "fd_dom",
                                    "--feature-net", "{missing}", "--out", "{tmp}/out/e.json"], ["missing"]),
    ("eval --inception missing", ["eval", "--samples", "{samples}", "--data", "digits", "--metrics", "fid",
                                  "--inception", "{missing}", "--out", "{tmp}/out/e.json"], ["missing"]),
    ("eval train-feature-net no --data", ["eval", "train-feature-net", "--out", "{tmp}/out"], ["--data"]),
    ("eval train-feature-net --data bogus", ["eval", "train-feature-net", "--data", "bogus", "--out", "{tmp}/out"], ["bogus"]),
    ("eval train-feature-net --data-path missing", ["eval", "train-feature-net", "--data", "npz", "--data-path", "{missing}",
                                                    "--out", "{tmp}/out"], ["missing"]),
    ("eval train-feature-net --train-steps 0", ["eval", "train-feature-net", "--data", "digits", "--train-steps", "0",
                                                "--out", "{tmp}/out"], ["--train-steps"]),
    ("eval train-feature-net --out a file", ["eval", "train-feature-net", "--data", "digits", "--train-steps", "1",
                                             "--out", "{file}"], ["{file}"]),
]


@pytest.fixture(scope="module")
def bad_inputs(trained_run, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("bad_inputs")
    checkpoint = trained_run / "checkpoints" / "step_0000003"
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("in the way\n")
    garbage = root / "garbage"
    shutil.copytree(checkpoint, garbage)
    (garbage / "config.json").write_text("{not json")
    truncated = root / "truncated"
    shutil.copytree(checkpoint, truncated)
    for file in truncated.glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:100])
    np.savez(root / "samples.npz", images=np.zeros((4, 1, 8, 8), dtype=np.uint8), labels=np.zeros(4, dtype=np.int64))
    return {"run": str(trained_run), "missing": str(root / "missing"), "text": str(root / "notes.txt"),
            "binary": str(root / "blob.bin"), "garbage": str(garbage), "truncated": str(truncated),
            "file": str(root / "a_file"), "samples": str(root / "samples.npz"),
            "configs": str(Path(__file__).resolve().parents[1] / "configs")}


def _tree(folder):
    return {str(p): p.stat().st_mtime_ns for p in sorted(Path(folder).rglob("*"))}


@pytest.mark.parametrize("name, argv, words", BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_every_command_refuses_bad_input_in_one_line(bad_inputs, trained_run, tmp_path, capsys, name, argv, words):
    places = {**bad_inputs, "tmp": str(tmp_path)}
    before = {**_tree(trained_run), **_tree(tmp_path), **_tree(places["file"].rsplit("/", 1)[0])}
    code = main([part.format(**places) for part in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("selfflow: error:"), (code, err)
    for word in words:
        assert word.format(**places) in lines[0], (word, lines[0])
    after = {**_tree(trained_run), **_tree(tmp_path), **_tree(places["file"].rsplit("/", 1)[0])}
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


# ---- one vocabulary ------------------------------------------------------------------------------
def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_command_that_reads_a_model_takes_ckpt_and_every_help_shows_defaults():
    from selfflow.cli import build_parser

    commands = dict(_subparsers(build_parser()))
    for name in ("sample", "export", "generate-set", "eval", "synth", "import", "modality sample", "modality eval",
                 "represent probe"):
        assert "--ckpt" in commands[name]._option_string_actions, name
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, [], "==SUPPRESS==") and action.help:
                assert "default" in formatter._get_help_string(action), (name, action.dest)
    assert "(default: 64)" in commands["sample"].format_help()  # --n
    assert "(seed + k) mod classes" in " ".join(commands["sample"].format_help().split())


def test_old_checkpoint_flags_still_work_with_a_note(trained_run, tmp_path, capsys):
    assert main(["synth", "--generator", str(trained_run), "--captions", "classes", "--per-caption", "2", "--n", "4",
                 "--out", str(tmp_path / "set"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--generator is deprecated" in err and "use --ckpt" in err


def test_version():
    import selfflow

    proc = subprocess.run([sys.executable, "-m", "selfflow", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"selfflow {selfflow.__version__}"


def test_a_closed_pipe_exits_quietly_with_status_0():
    proc = subprocess.run(f"{sys.executable} -m selfflow train --print-config | head -n 2", shell=True,
                          capture_output=True, text=True, executable="/bin/bash",
                          env={**__import__("os").environ, "PYTHONUNBUFFERED": "0"})
    assert proc.stdout.count("\n") == 2 and proc.stderr == "", proc.stderr
    code = subprocess.run(f"set -o pipefail; {sys.executable} -m selfflow train --print-config | head -c 1 >/dev/null",
                          shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert code.returncode == 0 and code.stderr == "", code.stderr


def test_log_lines_go_through_tqdm_and_never_break_a_bar():
    import io
    import logging

    from tqdm import tqdm

    from selfflow.arguments import TqdmLogHandler

    stream = io.StringIO()
    logger = logging.getLogger("selfflow.test_bar")
    logger.propagate = False
    logger.addHandler(TqdmLogHandler(stream))
    try:
        with tqdm(total=3, file=stream, desc="bar", mininterval=0) as bar:
            bar.update(1)
            logger.warning("the line")
            bar.update(1)
    finally:
        logger.handlers.clear()
    # the bar is cleared before the line and redrawn after it: the line stands alone
    assert "the line\n" in stream.getvalue()
    assert any(piece == "the line" for line in stream.getvalue().split("\n") for piece in line.split("\r"))
    plain = io.StringIO()
    with tqdm(total=3, file=plain, desc="bar", mininterval=0) as bar:
        bar.update(1)
        plain.write("the line\n")  # what a plain StreamHandler does: glued to the bar
    assert not any(piece == "the line" for line in plain.getvalue().split("\n") for piece in line.split("\r"))
