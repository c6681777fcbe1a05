"""The reliability promises (docs/reliability.md), one test per case of the adversarial trial:

- output folders: a command writes only into an empty, absent or own folder; --force writes its own
  files and deletes nothing; reading and writing one folder is refused;
- one writer per run or set folder (an OS lock, released by kill -9);
- no code from files: the FID Inception's weights are read as data into our own network;
- one-line errors, bounds checked before allocation, no silent wrong numbers.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.cli import main
from support import LOCAL_INCEPTION, REPO, one_line_error

NOTES = "my own notes: keep me\n"


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_args(out: Path, steps: int = 2) -> list[str]:
    return ["train", "--set", "model.depth=2", "--set", "model.hidden_size=64", "--set", f"train.steps={steps}",
            "--set", "train.batch_size=16", "--set", f"train.out_dir={out}", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "train.num_sample_images=0", "--set", "train.device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny run (its checkpoint, config.yaml, metrics.jsonl)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    assert main(_train_args(out) + ["--set", "sample.steps=2", "--set", "train.log_every=1"]) == 0
    return out


# --------------------------------------------------------------------------------------------
# 1. the output-folder rule
# --------------------------------------------------------------------------------------------
def _commands(run: Path, tmp: Path) -> dict:
    """Every command that takes an output folder, with settings that pass argparse (the rule is checked first)."""
    ckpt = str(run)
    return {
        "sample": ["sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--device", "cpu", "--out"],
        "export": ["export", "--ckpt", ckpt, "--out"],
        "import": ["import", "--ckpt", str(tmp / "x.pt"), "--from", "sit", "--out"],
        "generate-set": ["generate-set", "--ckpt", ckpt, "--n", "4", "--steps", "2", "--device", "cpu", "--out"],
        "encode-latents": ["encode-latents", "--data", "digits", "--autoencoder", str(tmp / "ae"), "--out"],
        "synth": ["synth", "--ckpt", ckpt, "--captions", "classes", "--per-caption", "2", "--n", "4", "--out"],
        "data fetch": ["data", "fetch", "mnist", "--base-url", "file:///nonexistent", "--to"],
        "eval train-feature-net": ["eval", "train-feature-net", "--data", "digits", "--out"],
        "modality sample": ["modality", "sample", "--ckpt", ckpt, "--out"],
        "modality eval --work": ["modality", "eval", "--ckpt", ckpt, "--work"],
        "represent probe": ["represent", "probe", "--config", str(REPO / "configs" / "digits_stablerep.yaml"), "--out"],
        "quickstart": ["quickstart", "--tiny", "--device", "cpu", "--out"],
        "pipeline": ["pipeline", "--config", str(REPO / "configs" / "digits_pipeline.yaml"), "--set"],
    }


@pytest.mark.parametrize("command", list(_commands(Path("r"), Path("t"))))
def test_every_output_folder_with_a_user_file_is_refused_and_kept(command, run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text(NOTES)
    args = _commands(run, tmp_path)[command]
    args = args + ([f"pipeline.out_dir={out}"] if command == "pipeline" else [str(out)])
    assert main(args) == 2
    one_line_error(capsys, str(out), "NOTES.txt")
    assert _listing(out) == {"NOTES.txt": NOTES.encode()}


TRAINERS = {  # the commands that train into train.out_dir (the rule is checked before data, model or logging)
    "train": ["train", "--config", str(REPO / "configs" / "digits_flow_matching.yaml")],
    "distill": ["distill", "reflow", "--config", str(REPO / "configs" / "digits_reflow.yaml")],
    "represent train": ["represent", "train", "--config", str(REPO / "configs" / "digits_stablerep.yaml")],
}


@pytest.mark.parametrize("command", list(TRAINERS))
def test_training_into_a_folder_with_a_user_file_is_refused_and_kept(command, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "NOTES.txt").write_text(NOTES)
    (out / "sub" / "data.bin").write_bytes(b"\x00")
    assert main(TRAINERS[command] + ["--set", f"train.out_dir={out}", "--set", "train.device=cpu"]) == 2
    one_line_error(capsys, f"train.out_dir {out}", "NOTES.txt", "not written by selfflow")
    assert _listing(out) == {"NOTES.txt": NOTES.encode(), "sub/data.bin": b"\x00"}  # no train.log, lock or marker


def test_a_run_folder_resumes_with_a_user_file_in_it_and_a_folder_of_another_command_is_refused(tmp_path, capsys):
    from selfflow.checkpoint import step_dir_name
    from selfflow.files import OUTPUT_MARKER

    out = tmp_path / "run"
    assert main(_train_args(out, steps=1)) == 0
    (out / "NOTES.txt").write_text(NOTES)  # the user's notes in their own run folder: it stays a run folder
    assert main(_train_args(out, steps=2)) == 0
    assert (out / "NOTES.txt").read_text() == NOTES and (out / "checkpoints" / step_dir_name(2)).is_dir()
    (out / OUTPUT_MARKER).unlink()  # a run folder written before markers existed: known by its checkpoints
    assert main(_train_args(out, steps=3)) == 0 and (out / "checkpoints" / step_dir_name(3)).is_dir()
    generated = tmp_path / "set"
    assert main(["generate-set", "--ckpt", str(out), "--n", "2", "--steps", "1", "--device", "cpu", "--out", str(generated)]) == 0
    before = _listing(generated)
    capsys.readouterr()
    assert main(_train_args(generated, steps=1)) == 2  # a set folder is not a run folder
    one_line_error(capsys, f"train.out_dir {generated}", "written by `set`")
    assert _listing(generated) == before


@pytest.mark.parametrize("command", ["eval", "modality eval"])
def test_a_report_file_that_is_not_ours_is_refused(command, run, tmp_path, capsys):
    report = tmp_path / "thesis.json"
    report.write_text('{"chapter": 1}')
    args = (["eval", "--ckpt", str(run), "--n", "2"] if command == "eval" else ["modality", "eval", "--ckpt", str(run)])
    assert main(args + ["--out", str(report)]) == 2
    one_line_error(capsys, str(report), "--force")
    assert report.read_text() == '{"chapter": 1}'


def test_export_and_import_write_their_files_and_keep_the_users(run, tmp_path, capsys):
    from selfflow.files import output_purpose

    run_before = _listing(run)
    # import/export into a run folder: refused (it holds checkpoints/, config.yaml, metrics.jsonl)
    (tmp_path / "x.safetensors").write_bytes(b"")
    for args in (["export", "--ckpt", str(run), "--out", str(run)], ["import", "--ckpt", str(tmp_path / "x.safetensors"), "--from", "sit", "--out", str(run)]):
        assert main(args) == 2
        one_line_error(capsys, str(run))
    assert _listing(run) == run_before
    # an exported model folder is export's own: a second export writes into it without --force
    model = tmp_path / "model"
    assert main(["export", "--ckpt", str(run), "--out", str(model)]) == 0
    (model / "NOTES.txt").write_text(NOTES)
    assert main(["export", "--ckpt", str(run), "--weights", "model", "--out", str(model)]) == 0
    assert (model / "NOTES.txt").read_text() == NOTES and output_purpose(model) is None  # known by model.safetensors
    # --force into a foreign folder: the command's files appear, nothing else is touched
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "NOTES.txt").write_text(NOTES)
    (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
    assert main(["export", "--ckpt", str(run), "--out", str(foreign), "--force"]) == 0
    left = _listing(foreign)
    assert left["NOTES.txt"] == NOTES.encode() and left["sub/data.bin"] == b"\x00\x01"
    assert set(left) == {"NOTES.txt", "sub/data.bin", "config.json", "model.safetensors", "README.md"}
    capsys.readouterr()


def test_reading_and_writing_one_folder_is_refused(run, tmp_path, capsys):
    from selfflow.files import check_output_folder

    before = _listing(run)
    checkpoint = run / "checkpoints"
    assert main(["sample", "--ckpt", str(checkpoint), "--out", str(run), "--force"]) == 2  # --force does not lift it
    one_line_error(capsys, "reads", str(checkpoint))
    assert _listing(run) == before
    with pytest.raises(Exception, match="reads"):
        check_output_folder(run, "run", reads=(run / "checkpoints",))
    assert check_output_folder(tmp_path / "x" / "inner", "model", reads=(tmp_path / "x",))  # a new folder inside a read one


def test_output_rule_recognises_its_own_folders(tmp_path):
    from selfflow.errors import ConfigError
    from selfflow.files import atomic_directory, check_output_folder, mark_output_folder

    folder = tmp_path / "f"
    assert check_output_folder(folder, "set")  # absent
    folder.mkdir()
    assert check_output_folder(folder, "set")  # empty
    (folder / "set.json").write_text("{}")
    assert not check_output_folder(folder, "set", recognise=("set.json",))  # written before markers existed
    with pytest.raises(ConfigError, match="set.json"):
        check_output_folder(folder, "model")
    mark_output_folder(folder, "model")
    assert not check_output_folder(folder, "model")
    with pytest.raises(ConfigError, match="written by `model`"):
        check_output_folder(folder, "sample")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a file is in the way"):
        check_output_folder(tmp_path / "file", "model")
    # a merged write keeps the other files; a replacing one (checkpoints) swaps the folder
    with atomic_directory(folder) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (folder / "set.json").exists() and (folder / "a.txt").read_text() == "new"
    with atomic_directory(folder, replace=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in folder.iterdir()] == ["b.txt"]


# --------------------------------------------------------------------------------------------
# 2. one writer per run folder
# --------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from selfflow.files import lock_folder
lock_folder(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO)), str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("command", ["train", "generate-set", "pipeline"])
def test_a_second_writer_is_refused_naming_the_first_and_kill_9_releases_it(command, run, tmp_path, capsys):
    out = tmp_path / "busy"
    args = {"train": _train_args(out),
            "generate-set": ["generate-set", "--ckpt", str(run), "--n", "2", "--shard-size", "2", "--steps", "2", "--device", "cpu",
                             "--out", str(out)],
            "pipeline": ["pipeline", "--config", str(REPO / "configs" / "digits_pipeline.yaml"), "--set", f"pipeline.out_dir={out}",
                         "--print-config"]}[command]
    holder = _hold_lock(out)
    try:
        if command == "pipeline":  # a real pipeline run is long: the library call, refused before any stage
            from selfflow.config import load_pipeline_config
            from selfflow.errors import ConfigError
            from selfflow.pipeline import run_pipeline

            with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
                run_pipeline(load_pipeline_config(str(REPO / "configs" / "digits_pipeline.yaml"), [f"pipeline.out_dir={out}"]))
            assert not (out / "teacher").exists()
        else:
            assert main(args) == 2
            one_line_error(capsys, str(out), f"in use by process {holder.pid}")
            assert not (out / "checkpoints").exists() and not (out / "set.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    if command != "pipeline":
        assert main(args) == 0  # the lock died with its holder


FORKING_HOLDER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from selfflow.files import lock_folder
lock_folder(sys.argv[1]).__enter__()
child = os.fork()  # a forked data worker inherits the descriptors of its parent
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_forked_worker_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """Data workers are forked from the writer; kill -9 of the writer frees the folder at once."""
    from selfflow.files import lock_folder

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER.format(repo=str(REPO)), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the worker is still alive
        with lock_folder(folder):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_second_trainer_in_one_process_sequence_is_fine(tmp_path):
    """The lock is held for fit's life only: a resume in the same process takes it again."""
    out = tmp_path / "run"
    assert main(_train_args(out, steps=1)) == 0
    assert main(_train_args(out, steps=2)) == 0


# --------------------------------------------------------------------------------------------
# 3. no code from files
# --------------------------------------------------------------------------------------------
PAYLOAD = '''
import sys, torch
class Payload(torch.nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
    def forward(self, x):
        t = torch.from_file(self.victim, shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        return x + t.sum()
class Layers(torch.nn.Module):
    def __init__(self, victim):
        super().__init__()
        self.conv = Payload(victim)
class Net(torch.nn.Module):
    def __init__(self, victim):
        super().__init__()
        self.layers = Layers(victim)
class Wrap(torch.nn.Module):
    def __init__(self, victim):
        super().__init__()
        self.net = Net(victim)
    def forward(self, x):
        return self.net.layers.conv(x)
torch.jit.script(Wrap(sys.argv[1])).save(sys.argv[2])
'''


def test_a_torchscript_payload_never_runs(tmp_path, capsys):
    """A TorchScript file whose code overwrites another file (through torch.from_file(shared=True)) is
    read as weights only and refused: the victim file keeps its bytes."""
    script = tmp_path / "payload_maker.py"
    script.write_text(PAYLOAD)
    victim, payload = tmp_path / "victim.txt", tmp_path / "payload.pt"
    victim.write_bytes(b"safe")
    subprocess.run([sys.executable, str(script), str(victim), str(payload)], check=True)
    from selfflow.errors import DataError
    from selfflow.evaluation import load_inception

    with pytest.raises(DataError, match="not the FID Inception layout"):
        load_inception(payload).features(torch.zeros(1, 1, 8, 8))
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 8, 8), np.uint8))
    assert main(["eval", "--samples", str(samples), "--metrics", "fid", "--inception", str(payload), "--data", "digits",
                 "--out", str(tmp_path / "e.json")]) == 2
    one_line_error(capsys, str(payload))
    assert victim.read_bytes() == b"safe"


def _archive(tmp_path: Path, data_pkl: bytes, storages: dict | None = None) -> Path:
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", data_pkl)
        for key, raw in (storages or {}).items():
            archive.writestr(f"m/data/{key}", raw)
    return path


def test_archive_reader_refuses_globals_and_oversized_views(tmp_path):
    from selfflow.errors import DataError
    from selfflow.evaluation.inception_net import read_archive_weights

    marker = tmp_path / "marker"
    evil = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    with pytest.raises(DataError, match="refusing the global os.system"):
        read_archive_weights(_archive(tmp_path, evil))
    assert not marker.exists()
    # a zero-stride tensor declaring 65 536 × 65 536 elements over a 4-byte storage: refused before any allocation
    rebuild = (b"\x80\x02c__torch__\nM\n)\x81}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n"  # M() with w =
               b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"  # storage '0', 1 float
               b"K\x00J\x00\x00\x01\x00J\x00\x00\x01\x00\x86K\x00K\x00\x86"  # offset 0, size (65536, 65536), stride (0, 0)
               b"\x89ccollections\nOrderedDict\n)RtRub.")
    with pytest.raises(DataError, match="does not fit its storage"):
        read_archive_weights(_archive(tmp_path, rebuild, {"0": b"\x00" * 4}))


@pytest.mark.skipif(not LOCAL_INCEPTION.is_file(), reason="needs a local fid_inception_v3_fp16.pt")
def test_our_inception_matches_the_torchscript_network_exactly():
    import warnings

    from selfflow.evaluation.inception import INCEPTION_STAGES, InceptionNetwork, preprocess_for_inception

    ours = InceptionNetwork(LOCAL_INCEPTION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(LOCAL_INCEPTION)).float().eval()  # the test's reference only: a known file
    x = preprocess_for_inception(torch.rand(2, 3, 16, 16) * 2 - 1)
    with torch.no_grad():
        assert torch.equal(ours(x), scripted(x))
        reference = x
        for name in INCEPTION_STAGES[:8]:
            reference = getattr(scripted.net.layers, name)(reference)
        assert torch.equal(ours(x, "mixed"), reference)


def test_no_loader_can_run_code_from_a_file():
    """Every call in the package (read from its syntax tree): no torch.jit.load, pickle.load(s), yaml.load,
    yaml.unsafe_load, eval or exec; np.load never with allow_pickle=True; torch.load only with weights_only=True."""
    import ast

    def name(node) -> str:
        return f"{name(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")

    found = []
    for path in sorted((REPO / "selfflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            called = name(node.func)
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if (called in ("torch.jit.load", "jit.load", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec")
                    or (called.endswith("load") and keywords.get("allow_pickle") is True)
                    or (called == "torch.load" and keywords.get("weights_only") is not True)):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {called}")
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------------------------
# 4. one-line errors, bounds before allocation
# --------------------------------------------------------------------------------------------
def _sit_state() -> dict:
    from selfflow.interop import export_state
    from support import perturbed_dit

    return export_state(perturbed_dit(depth=2, time_scale=-1.0, time_shift=1.0), "sit")


def _malformed(case: str) -> dict:
    state = _sit_state()
    if case == "missing block weight":
        del state["blocks.0.mlp.fc1.weight"]
    elif case == "int key":
        state[7] = torch.zeros(2)
    elif case == "1-D embedding":
        state["y_embedder.embedding_table.weight"] = torch.zeros(64)
    elif case == "width 0":
        state["x_embedder.proj.weight"] = torch.zeros(0, 1, 2, 2)
    elif case == "wrong pos_embed":
        state["pos_embed"] = torch.zeros(1, 16, 63)
    elif case == "odd block name":
        state["blocks.one.attn.qkv.weight"] = torch.zeros(2)
    elif case == "NaN weight":
        state["blocks.0.attn.proj.weight"][0, 0] = float("nan")
    elif case == "zero-stride 65536 width":  # a few bytes of storage declaring gigabytes
        width = 65536
        state = {k: torch.zeros(1).expand(*[width if s == 64 else s for s in v.shape]) for k, v in state.items()}
    return state


MALFORMED = {"missing block weight": "blocks.0.mlp.fc1.weight", "int key": "not text", "1-D embedding": "y_embedder.embedding_table.weight",
             "width 0": "width 0", "wrong pos_embed": "pos_embed", "odd block name": "blocks.one.attn.qkv.weight",
             "NaN weight": "blocks.0.attn.proj.weight", "zero-stride 65536 width": "storage of 4 bytes"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_state_dicts_are_one_line_errors_naming_the_key(case, tmp_path, capsys):
    import resource

    path = tmp_path / "bad.pt"
    torch.save({"ema": _malformed(case)}, path)
    assert case != "zero-stride 65536 width" or path.stat().st_size < 20_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["import", "--ckpt", str(path), "--from", "sit", "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, str(path), MALFORMED[case])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: nothing the size of the declared network
    assert not (tmp_path / "m").exists()


def test_deeply_nested_args_are_a_one_line_error(tmp_path, capsys):
    """A training dict whose ``args`` is a list nested 200 000 deep (built by pickle opcodes, no recursion)."""
    depth = 200_000
    torch.save({"ema": _sit_state()}, tmp_path / "plain.pt")
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(tmp_path / "plain.pt") as plain, zipfile.ZipFile(path, "w") as archive:
        for info in plain.infolist():
            raw = plain.read(info)
            if info.filename.endswith("/data.pkl"):
                assert raw.endswith(b".")  # STOP, the top-level dict on the stack
                nested = b"X\x04\x00\x00\x00args" + b"]" * depth + b"a" * (depth - 1)  # EMPTY_LIST ×N, APPEND ×(N−1)
                raw = raw[:-1] + nested + b"s."  # SETITEM args, STOP
            archive.writestr(info, raw)
    code = main(["import", "--ckpt", str(path), "--from", "sit", "--out", str(tmp_path / "m")])
    one_line_error(capsys, str(path), "nested too deeply")
    assert code == 2 and not (tmp_path / "m").exists()


def test_a_full_disk_during_export_and_import_names_the_file_and_the_free_space(run, tmp_path, monkeypatch, capsys):
    import errno

    from safetensors import SafetensorError

    from selfflow import files

    def full(tensors, path, metadata=None):
        raise SafetensorError(f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: \"{os.strerror(errno.ENOSPC)}\" }})")

    monkeypatch.setattr(files, "save_file", full)
    torch.save({"ema": _sit_state()}, tmp_path / "s.pt")
    for args in (["export", "--ckpt", str(run), "--out", str(tmp_path / "e")],
                 ["import", "--ckpt", str(tmp_path / "s.pt"), "--from", "sit", "--out", str(tmp_path / "i")]):
        assert main(args) == 2
        line = one_line_error(capsys, "model.safetensors", "MB free on its disk", "No space left on device")
        assert "untouched" in line
    assert not (tmp_path / "e").exists() and not (tmp_path / "i").exists()


def test_a_pairs_set_with_a_shard_of_another_shape_names_the_shard(tmp_path):
    from selfflow.errors import ShardError
    from selfflow.shards import ShardSet

    shards = ShardSet.create_or_resume(tmp_path / "pairs", {"kind": "pairs", "num": 4, "shard_size": 2})
    shards.write(0, {"noise": torch.zeros(2, 1, 8, 8), "samples": torch.zeros(2, 1, 8, 8)})
    shards.write(1, {"noise": torch.zeros(2, 1, 4, 4), "samples": torch.zeros(2, 1, 4, 4)})
    with pytest.raises(ShardError, match="shard_00001.safetensors: (noise|samples) has items of shape"):
        ShardSet.open(tmp_path / "pairs").read_all()


def test_eval_samples_one_image_or_a_truncated_npz_or_foreign_labels(tmp_path, capsys):
    one = tmp_path / "one.npz"
    np.savez(one, images=np.zeros((1, 8, 8), np.uint8))
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((6, 8, 8), np.uint8), labels=np.array([0, 1, 2, 3, 4, 99]))
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    common = ["--data", "digits", "--metrics", "fd_dom", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    for samples, needle in ((one, "at least 2"), (truncated, "cannot read as .npz"), (good, "label 99 is outside")):
        assert main(["eval", "--samples", str(samples), *common, "--out", str(tmp_path / "e.json")]) == 2
        one_line_error(capsys, str(samples), needle)
    assert not (tmp_path / "e.json").exists()


# --------------------------------------------------------------------------------------------
# 5. no silent wrong numbers
# --------------------------------------------------------------------------------------------
def test_nan_weights_are_refused_at_load(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    assert main(["export", "--ckpt", str(run), "--out", str(model)]) == 0
    weights = load_file(str(model / "model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = weights[key].clone().fill_(float("nan"))
    save_file(weights, str(model / "model.safetensors"))
    assert main(["sample", "--ckpt", str(model), "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, "model.safetensors", key, "NaN")


def test_a_probe_on_a_one_split_data_set_is_refused(tmp_path, capsys):
    data = tmp_path / "digits.npz"
    np.savez(data, images=np.zeros((20, 8, 8), np.uint8), labels=np.arange(20) % 10)
    config = str(REPO / "configs" / "digits_stablerep.yaml")
    run_dir = tmp_path / "enc"
    assert main(["represent", "train", "--config", config, "--set", "train.steps=1", "--set", "train.batch_size=8",
                 "--set", f"train.out_dir={run_dir}", "--set", "train.device=cpu", "--set", "train.progress=false",
                 "--set", "train.tensorboard=false", "--set", "data.name=digits", "--set", "data.path=null",
                 "--set", "method.name=supcon"]) == 0  # class labels as positives (stablerep needs a synthetic set)
    capsys.readouterr()
    assert main(["represent", "probe", "--config", config, "--set", f"train.out_dir={run_dir}", "--data", "npz",
                 "--data-path", str(data), "--device", "cpu", "--max-iter", "5"]) == 2
    one_line_error(capsys, str(data), "leaked accuracy")
    assert not (run_dir / "probe.json").exists()


def test_metrics_jsonl_is_cut_back_to_the_checkpoint_on_resume(tmp_path):
    """A run killed after logging steps past its last checkpoint: the resumed run logs each step once."""
    from support import logged_losses  # noqa: F401  (the same file format)

    out = tmp_path / "run"
    assert main(_train_args(out, steps=2)) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    ghost = [json.dumps({"step": 3, "loss": 9.0}), json.dumps({"step": 4, "loss": 9.0})]  # logged, then killed before a checkpoint
    (out / "metrics.jsonl").write_text("\n".join(lines + ghost) + "\n")
    assert main(_train_args(out, steps=4)) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert all(json.loads(line)["loss"] != 9.0 for line in (out / "metrics.jsonl").read_text().splitlines())


# --------------------------------------------------------------------------------------------
# 6. kill -9 across the pipeline (train and generate-set trials: tests/test_faults.py)
# --------------------------------------------------------------------------------------------
PIPELINE_TRIALS = 4


def _pipeline_results(folder: Path) -> dict:
    """Bytes of every set shard and of each run's newest checkpoint weights, by path in the folder."""
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        relative = path.relative_to(folder)
        if path.name.startswith("shard_"):
            found[str(relative)] = path.read_bytes()
        elif path.parent.parent.name == "checkpoints" and path.name in ("model.safetensors", "ema.safetensors"):
            newest = sorted(p.name for p in path.parent.parent.iterdir() if p.name.startswith("step_"))[-1]
            if path.parent.name == newest:
                found[str(relative)] = path.read_bytes()
    return found


@pytest.mark.slow
def test_kill_minus_9_across_the_pipeline_resumes_bit_identically(tmp_path, trial_report):
    """`selfflow quickstart --tiny` killed at random moments, run again until it finishes: every
    shard and every stage's final weights equal one uninterrupted run's, byte for byte."""
    import random

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "selfflow", "quickstart", "--tiny", "--device", "cpu", "--out", str(out)]

    start = time.perf_counter()
    subprocess.run(command(tmp_path / "reference"), env=env, check=True, capture_output=True)
    duration = time.perf_counter() - start
    reference = _pipeline_results(tmp_path / "reference")
    assert any(name.startswith("synth") or "shard_" in name for name in reference) and len(reference) >= 4
    rng, lines, failures, kills = random.Random(24), [], 0, 0
    for trial in range(PIPELINE_TRIALS):
        out = tmp_path / f"trial{trial}"
        delay = rng.uniform(0.1, 0.6) * duration  # a loaded machine runs slower, rarely faster, than the reference
        proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
            kills += 1
        again = subprocess.run(command(out), env=env, capture_output=True, text=True)
        same = again.returncode == 0 and _pipeline_results(out) == reference
        failures += not same
        lines.append(f"  pipeline trial {trial + 1}: SIGKILL after {delay:.1f} s{'' if killed else ' (finished first)'}; "
                     f"resumed: {'bit-identical' if same else 'DIFFERENT: ' + again.stderr[-300:]}")
    trial_report.append(f"pipeline: {PIPELINE_TRIALS} trials ({kills} kill -9 at a random moment), failures: {failures}")
    trial_report.extend(lines)
    assert failures == 0, "\n".join(lines)
    assert kills >= PIPELINE_TRIALS // 2, "\n".join(lines)
