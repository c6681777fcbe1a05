"""The command line as a user meets it: exit codes, one-line errors, files written."""
import json
import subprocess
import sys

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


def test_sample_rejects_bad_labels(trained_run, tmp_path, capsys):
    code = main(["sample", "--ckpt", str(trained_run), "--n", "2", "--out", str(tmp_path), "--labels", "12", "--device", "cpu"])
    assert code == 2 and "outside 0..9" in capsys.readouterr().err


def test_export_leaves_out_training_state(trained_run, tmp_path):
    assert main(["export", "--ckpt", str(trained_run), "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["config.json", "model.safetensors"]
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


def test_quickstart_writes_grid_and_report(tmp_path):
    from selfflow.quickstart import run_quickstart

    report = run_quickstart(out_dir=str(tmp_path / "qs"), steps=4, device="cpu", classifier_steps=20)
    record = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert report.is_file() and (tmp_path / "qs" / "samples.png").is_file()
    assert record["steps"] == 4 and record["status"] == "finished"
    assert record["fd_dom_train_vs_test_floor"] >= 0 and 0 <= record["classifier_accuracy_on_samples"] <= 1


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
