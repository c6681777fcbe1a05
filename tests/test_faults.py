"""Fault tolerance: kill -9 at random points, SIGTERM, a full disk, an unwritable folder.

Each trial kills a training (or set-generation) process, runs the same command again, and checks
that the result is bit-identical to one uninterrupted run. Processes are forked from a server that
has imported torch and selfflow once (multiprocessing's "forkserver"), so a trial costs a fork,
not an interpreter start. The report (trials, kills by kind, failures) is printed at the end of the
pytest run (tests/conftest.py, "fault trials").

Kinds of kill (chosen per trial by a seeded random generator):

- ``step``: SIGKILL sent by the process to itself in the middle of an optimisation step (after
  the optimizer moved the weights in memory, before the EMA and the step counter);
- ``write``: SIGKILL in the middle of writing one file of a checkpoint folder (the file is left
  half-written in the temporary folder);
- ``time``: SIGKILL from outside after a random delay;
- ``term``: SIGTERM from outside: the run must save, exit 0, and resume like the others.
"""
import contextlib
import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from support import tiny_run

STEPS = 8
TRAIN_TRIALS = 12  # kill -9 trials on training (4 step, 4 write, 4 time), plus 2 SIGTERM trials
SET_TRIALS = 4  # kill -9 trials on set generation (2 mid-shard write, 2 time)
SEED = 1234


def _raw(out_dir, steps=STEPS, **train):
    return tiny_run(out_dir, train={"steps": steps, "ckpt_every": 1, "keep_last": 2, **train})


# --------------------------------------------------------------------------------------------
# what runs in the forked children
# --------------------------------------------------------------------------------------------
def _quiet(log_path):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _train_child(raw, kill, log_path):
    """Train; ``kill`` = ("step", k) or ("write", k) makes the process SIGKILL itself at that point."""
    _quiet(log_path)
    from selfflow import files
    from selfflow import trainer as trainer_module
    from selfflow.config import config_from_dict

    if kill is not None:
        where, at = kill
        calls = [0]
        if where == "step":
            original_update = trainer_module.EMA.update

            def update(self, model, step):
                calls[0] += 1
                if calls[0] == at:
                    _die()
                return original_update(self, model, step)

            trainer_module.EMA.update = update
        else:
            original_save = files.save_file  # every checkpoint file goes through selfflow.files.save_tensors

            def save_file(tensors, path, metadata=None):
                calls[0] += 1
                original_save(tensors, path, metadata=metadata)
                if calls[0] == at:
                    with open(path, "r+b") as handle:  # leave the file half-written
                        handle.truncate(os.path.getsize(path) // 2)
                    _die()

            files.save_file = save_file
    trainer = trainer_module.Trainer(config_from_dict(raw))
    try:
        trainer.fit()
    finally:
        trainer.close()


def _set_child(model_dir, out, kill_at_shard, log_path):
    """Generate a set; ``kill_at_shard`` = k makes the process SIGKILL itself halfway through writing shard k."""
    _quiet(log_path)
    from selfflow import sets, shards
    from selfflow.model import DiT

    if kill_at_shard is not None:
        original = shards.write_bytes

        def write_bytes(path, data):
            if Path(path).name.startswith(f".{shards.shard_name(kill_at_shard)}.tmp-"):
                with open(path, "wb") as handle:  # half the shard on disk, then the kill
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                _die()
            original(path, data)

        shards.write_bytes = write_bytes
    model = DiT.from_pretrained(model_dir, weights="ema.safetensors")
    sets.generate_set(model, out, num=40, shard_size=8, seed=3, sampler="heun", steps=3, batch_size=5)


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # torch._dynamo: the optimizer imports it lazily, and it is most of a child's start-up.
        _CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "tqdm.auto", "selfflow.trainer", "selfflow.methods.flow_matching",
                                         "selfflow.shards", "selfflow.sets", "selfflow.sampling", "sklearn.datasets"])
    return _CONTEXT


def _start(target, *args):
    proc = _context().Process(target=target, args=args)
    proc.start()
    return proc


def _finish(proc, timeout=120):
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError("child did not finish in time")
    return proc.exitcode


def _wait_for(path, proc, timeout=60):
    """Until ``path`` exists and is not empty (the child is past its start-up), or the child ends."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.is_alive():
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# comparing finished runs
# --------------------------------------------------------------------------------------------
def _final_state(out):
    from selfflow import checkpoint as ckpt

    folder = ckpt.latest_checkpoint(Path(out) / "checkpoints")
    tensors = {}
    for name in ("model", "ema", "optimizer", "rng"):
        tensors.update({f"{name}/{k}": v for k, v in ckpt.load_tensors(folder / f"{name}.safetensors").items()})
    state = json.loads((folder / "state.json").read_text())
    return folder.name, tensors, {k: state[k] for k in ("step", "data", "optimizer")}


def _differences(a, b):
    name_a, tensors_a, state_a = a
    name_b, tensors_b, state_b = b
    problems = []
    if name_a != name_b:
        problems.append(f"newest checkpoint {name_a} vs {name_b}")
    if tensors_a.keys() != tensors_b.keys():
        problems.append("different tensor names")
    problems += [f"{k} differs" for k in tensors_a if k in tensors_b and not torch.equal(tensors_a[k], tensors_b[k])]
    if state_a != state_b:
        problems.append("state.json differs")
    return problems


def _newest_step(out):
    from selfflow import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(Path(out) / "checkpoints")
    return int(latest.name.split("_")[1]) if latest else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    proc = _start(_train_child, _raw(root / "reference"), None, str(root / "reference.log"))
    _wait_for(root / "reference" / "metrics.jsonl", proc)
    start = time.perf_counter()  # the training loop's duration, for the random-time kills
    assert _finish(proc) == 0, (root / "reference.log").read_text()
    return root, _final_state(root / "reference"), time.perf_counter() - start


def test_kill_minus_9_during_training_resumes_bit_identically(reference, trial_report):
    root, expected, duration = reference
    rng = random.Random(SEED)
    files_per_checkpoint = 4  # model, ema, optimizer, rng (flow matching has no method state)
    kinds = ["step", "write", "time"] * (TRAIN_TRIALS // 3) + ["term", "term"]
    lines, failures, killed = [], 0, {"step": 0, "write": 0, "time": 0, "term": 0}
    for number, kind in enumerate(kinds, start=1):
        out = root / f"trial_{number:02d}"
        log = str(root / f"trial_{number:02d}.log")
        kill = None
        if kind == "step":
            kill = ("step", rng.randint(1, STEPS))
        elif kind == "write":
            kill = ("write", rng.randint(1, STEPS * files_per_checkpoint))
        proc = _start(_train_child, _raw(out), kill, log)
        if kind in ("time", "term"):
            _wait_for(out / "metrics.jsonl", proc)
            time.sleep(rng.uniform(0.0, 0.6 * duration))
            with contextlib.suppress(ProcessLookupError):  # it may have finished already
                os.kill(proc.pid, signal.SIGKILL if kind == "time" else signal.SIGTERM)
        code = _finish(proc)
        expected_code = 0 if kind == "term" else -signal.SIGKILL
        was_hit = code == expected_code
        killed[kind] += was_hit
        temporaries = sorted(p.name for p in (out / "checkpoints").glob(".*")) if (out / "checkpoints").exists() else []
        at = _newest_step(out)
        resumed = _start(_train_child, _raw(out), None, log)
        resume_code = _finish(resumed)
        problems = [] if resume_code == 0 else [f"resume exited {resume_code}"]
        if resume_code == 0:
            problems += _differences(_final_state(out), expected)
        if kind == "term" and code not in (0, None):
            problems.append(f"SIGTERM exit code {code}")
        failures += bool(problems)
        what = {"step": f"SIGKILL in step {kill[1] if kill else ''}", "write": f"SIGKILL mid-file, checkpoint file #{kill[1] if kill else ''}",
                "time": "SIGKILL at a random time", "term": "SIGTERM at a random time"}[kind]
        hit = "" if was_hit else " (finished before the signal)"
        lines.append(f"  trial {number:2d}: {what}{hit}; newest checkpoint step {at}, temporaries {len(temporaries)}; "
                     f"resumed to step {STEPS}: {'bit-identical' if not problems else '; '.join(problems)}")
        shutil.rmtree(out, ignore_errors=True)
    total_kills = killed["step"] + killed["write"] + killed["time"]
    trial_report.append(
        f"training: {len(kinds)} trials ({total_kills} kill -9: {killed['step']} in a step, {killed['write']} mid-checkpoint-write, "
        f"{killed['time']} at a random time; {killed['term']} SIGTERM), failures: {failures}"
    )
    trial_report.extend(lines)
    assert failures == 0, "\n".join(lines)
    assert total_kills >= 10, "\n".join(lines)
    assert killed["term"] == 2, "\n".join(lines)


# --------------------------------------------------------------------------------------------
# set generation
# --------------------------------------------------------------------------------------------
def _set_files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_kill_minus_9_during_set_generation_resumes_bit_identically(reference, trial_report):
    root, _expected, _ = reference
    from selfflow import checkpoint as ckpt

    model_dir = ckpt.latest_checkpoint(root / "reference" / "checkpoints")
    proc = _start(_set_child, str(model_dir), str(root / "set_reference"), None, str(root / "set.log"))
    _wait_for(root / "set_reference" / "set.json", proc)
    start = time.perf_counter()
    assert _finish(proc) == 0, (root / "set.log").read_text()
    duration = time.perf_counter() - start
    expected = _set_files(root / "set_reference")
    assert len(expected) == 1 + 5  # set.json + 40 items in shards of 8

    rng = random.Random(SEED + 1)
    lines, failures, kills = [], 0, 0
    for number in range(1, SET_TRIALS + 1):
        out = root / f"set_{number}"
        kill_at = rng.randint(0, 4) if number % 2 else None
        proc = _start(_set_child, str(model_dir), str(out), kill_at, str(root / "set.log"))
        if kill_at is None:
            _wait_for(out / "set.json", proc)
            time.sleep(rng.uniform(0.0, 0.8 * duration))
            proc.kill()
        code = _finish(proc)
        kills += code == -signal.SIGKILL
        names = sorted(p.name for p in out.iterdir()) if out.exists() else []
        half = [n for n in names if n.startswith("shard_")]
        broken = []
        for name in half:  # every file under a shard's name must be whole
            try:
                from selfflow.shards import read_shard

                read_shard(out / name)
            except Exception as exc:  # noqa: BLE001 - report, don't stop the trials
                broken.append(f"{name}: {exc}")
        resumed = _start(_set_child, str(model_dir), str(out), None, str(root / "set.log"))
        problems = broken + ([] if _finish(resumed) == 0 else ["resume failed"])
        if not problems and _set_files(out) != expected:
            got = _set_files(out)
            differing = sorted(n for n in set(got) | set(expected) if got.get(n) != expected.get(n))
            problems.append(f"resumed set differs from the uninterrupted one in {differing}")
        failures += bool(problems)
        what = f"SIGKILL mid-write of shard {kill_at}" if kill_at is not None else "SIGKILL at a random time"
        lines.append(f"  set trial {number}: {what}{'' if code == -signal.SIGKILL else ' (finished first)'}; "
                     f"{len(half)} whole shards on disk; resumed: {'bit-identical' if not problems else '; '.join(problems)}")
    trial_report.append(f"set generation: {SET_TRIALS} trials ({kills} kill -9), failures: {failures}")
    trial_report.extend(lines)
    assert failures == 0, "\n".join(lines)


# --------------------------------------------------------------------------------------------
# disk full, unwritable folders (in process)
# --------------------------------------------------------------------------------------------
def _cli_train(out, *extra):
    from selfflow.cli import main

    args = ["train", "--set", "model.depth=2", "--set", "model.hidden_size=64", "--set", "train.batch_size=16",
            "--set", f"train.out_dir={out}", "--set", "train.progress=false", "--set", "train.tensorboard=false",
            "--set", "train.num_sample_images=0", "--set", "train.device=cpu", "--set", "train.ckpt_every=1"]
    for item in extra:
        args += ["--set", item]
    return main(args)


def _full_disk(monkeypatch, module, after_calls=0):
    """Make ``module.save_file`` write half a file and fail with ENOSPC (after some good calls)."""
    original = module.save_file
    calls = [0]

    def save_file(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] <= after_calls:
            return original(tensors, path, metadata=metadata)
        original(tensors, path, metadata=metadata)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(module, "save_file", save_file)


def test_disk_full_during_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    from selfflow import checkpoint as ckpt
    from selfflow import files

    out = tmp_path / "run"
    assert _cli_train(out, "train.steps=2") == 0
    good = ckpt.latest_checkpoint(out / "checkpoints")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    capsys.readouterr()
    _full_disk(monkeypatch, files, after_calls=2)  # fail on the third file of the next checkpoint
    assert _cli_train(out, "train.steps=4") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoint is untouched" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(out / "checkpoints") == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert _cli_train(out, "train.steps=4") == 0  # room again: it resumes from the good checkpoint
    assert _newest_step(out) == 4


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # fails even for root, unlike chmod
    assert _cli_train(blocker / "run", "train.steps=1") == 2
    err = capsys.readouterr().err
    assert "train.out_dir" in err and "cannot create" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_permission_denied_mid_checkpoint_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    from selfflow import checkpoint as ckpt

    out = tmp_path / "run"
    assert _cli_train(out, "train.steps=1") == 0
    good = ckpt.latest_checkpoint(out / "checkpoints")
    before = (good / "model.safetensors").read_bytes()

    def denied(obj, path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(ckpt, "write_json", denied)
    capsys.readouterr()
    assert _cli_train(out, "train.steps=2") == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(out / "checkpoints") == good and (good / "model.safetensors").read_bytes() == before


def test_disk_full_during_set_generation_keeps_whole_shards(reference, tmp_path, monkeypatch, capsys):
    from selfflow import checkpoint as ckpt
    from selfflow import shards
    from selfflow.cli import main

    root, _, _ = reference
    model_dir = ckpt.latest_checkpoint(root / "reference" / "checkpoints")
    out = tmp_path / "set"
    args = ["generate-set", "--ckpt", str(model_dir), "--out", str(out), "--n", "12", "--shard-size", "4", "--steps", "2", "--device", "cpu"]
    original, calls = shards.write_bytes, [0]

    def full(path, data):  # the second shard finds the disk full halfway through
        calls[0] += 1
        if calls[0] <= 2:  # set.json, shard 0
            return original(path, data)
        original(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(shards, "write_bytes", full)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "shard_00001.safetensors" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [".selfflow-output.json", ".selfflow.lock", "set.json", "shard_00000.safetensors"]
    first = (out / "shard_00000.safetensors").read_bytes()
    monkeypatch.undo()
    assert main(args) == 0
    assert (out / "shard_00000.safetensors").read_bytes() == first
    assert shards.ShardSet.open(out).read_all()["images"].shape == (12, 1, 8, 8)
