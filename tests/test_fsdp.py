"""FSDP2 on two gloo processes: the same losses and weights as one process at the same global batch,
and sharded checkpoints that load on a different number of processes without unpickling anything.

One spawn of two processes runs three phases (each a fresh Trainer and process group):

    A  fsdp/        steps 0 → 2, writes a sharded checkpoint
    B  fsdp/        resumes that sharded checkpoint on 2 processes, steps 2 → 4
    C  from_full/   resumes a 1-process (safetensors) checkpoint under FSDP, steps 2 → 4,
                    with activation checkpointing on, and samples from the gathered EMA weights

The method is Self-Flow, whose EMA teacher is sharded too and whose head lives in the FSDP root.
"""
import json
import os
import pickle
import shutil

import pytest
import torch

from selfflow import checkpoint as ckpt
from support import assert_tensors_close, fit, fit_phases, free_port, join_as_rank, leave_process_group_env, logged_losses, spawn_ranks, tiny_run, trainer_state


def _raw(out_dir, steps, **train):
    return tiny_run(out_dir, method={"name": "self_flow"}, sample={"steps": 2},
                    train={"steps": steps, "warmup_steps": 1, "ckpt_every": 2, "keep_last": 3, "distributed": "fsdp", **train})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(_raw(root / "one", 4, distributed="ddp"))  # the 1-process reference (no process group)
    finally:
        torch.set_num_threads(threads)
    (root / "from_full" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "one" / "checkpoints" / "step_0000002", root / "from_full" / "checkpoints" / "step_0000002")
    phases = [
        (free_port(), _raw(root / "fsdp", 2)),
        (free_port(), _raw(root / "fsdp", 4)),
        (free_port(), _raw(root / "from_full", 4, activation_checkpointing=True, num_sample_images=4)),
    ]
    spawn_ranks(fit_phases, 2, 2, phases)
    return root


def test_fsdp_two_processes_match_one_process(runs):
    assert logged_losses(runs / "fsdp") == pytest.approx(logged_losses(runs / "one"), rel=1e-5, abs=1e-6)
    # The sharded checkpoint carries the full EMA weights, gathered on rank 0, for sampling.
    one, two = runs / "one" / "checkpoints" / "step_0000004", runs / "fsdp" / "checkpoints" / "step_0000004"
    assert_tensors_close(ckpt.load_tensors(two / "ema.safetensors"), ckpt.load_tensors(one / "ema.safetensors"))


def test_sharded_checkpoint_is_one_safetensors_file_per_process(runs):
    folder = runs / "fsdp" / "checkpoints" / "step_0000004"
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2 and state["step"] == 4
    shards = sorted(p.name for p in (folder / "sharded").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    assert sorted(state["sharded"]["files"]) == shards
    assert {p.suffix for p in folder.iterdir() if p.is_file()} <= {".safetensors", ".json"}


def test_unsharded_checkpoint_resumes_under_fsdp(runs):
    assert logged_losses(runs / "from_full") == pytest.approx(logged_losses(runs / "one")[2:], rel=1e-5, abs=1e-6)
    one, two = runs / "one" / "checkpoints" / "step_0000004", runs / "from_full" / "checkpoints" / "step_0000004"
    assert_tensors_close(ckpt.load_tensors(two / "ema.safetensors"), ckpt.load_tensors(one / "ema.safetensors"))
    assert (runs / "from_full" / "samples" / "step_0000004.png").is_file()


def test_sharded_checkpoint_from_two_processes_resumes_on_one(runs, tmp_path):
    """Step 2 written by 2 FSDP processes → a plain 1-process trainer → step 4 equals the reference."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step_0000002", tmp_path / "run" / "checkpoints" / "step_0000002")
    resumed = fit(_raw(tmp_path / "run", 4, distributed="ddp"))
    assert logged_losses(tmp_path / "run") == pytest.approx(logged_losses(runs / "one")[2:], rel=1e-5, abs=1e-6)
    reference = fit(_raw(runs / "one", 4, distributed="ddp"))  # resumes at step 4: nothing left to train
    assert_tensors_close(trainer_state(resumed), trainer_state(reference))
    for a, b in zip(resumed.params, reference.params):
        assert_tensors_close(resumed.optimizer.state[a], reference.optimizer.state[b])


def test_sharded_loading_runs_no_pickle(runs, tmp_path):
    """A pickle planted in the shard folder (DCP's usual `.metadata` name) is never read."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step_0000002", run / "step_0000002")
    (run / "step_0000002" / "sharded" / ".metadata").write_bytes(pickle.dumps(Evil()))
    fit(_raw(tmp_path / "run", 3, distributed="ddp"))
    assert not marker.exists()


def test_truncated_shard_is_refused(runs, tmp_path):
    from selfflow.trainer import Trainer
    from selfflow.config import config_from_dict

    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step_0000002", run / "step_0000002")
    shard = sorted((run / "step_0000002" / "sharded").iterdir())[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    trainer = Trainer(config_from_dict(_raw(tmp_path / "run", 3, distributed="ddp")))
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        trainer.maybe_resume()


def test_disk_full_during_a_sharded_checkpoint_keeps_the_old_one(runs, tmp_path, monkeypatch):
    """The sharded writer's failure path, in one process (the same code runs on every rank)."""
    import errno

    from selfflow import fsdp
    from selfflow.config import config_from_dict
    from selfflow.trainer import Trainer

    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step_0000002", run / "step_0000002")
    before = {p.name: p.read_bytes() for p in (run / "step_0000002" / "sharded").iterdir()}
    trainer = Trainer(config_from_dict(_raw(tmp_path / "run", 3, distributed="ddp")))
    trainer.maybe_resume()
    trainer.train_step()
    trainer.sharded = True  # write as a sharded run would

    def full(directory, tensors):
        (directory / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsdp, "save_sharded_tensors", full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device; the previous checkpoint is untouched"):
        trainer.save_checkpoint()
    assert [p.name for p in run.iterdir()] == ["step_0000002"]
    assert {p.name: p.read_bytes() for p in (run / "step_0000002" / "sharded").iterdir()} == before
    monkeypatch.undo()
    trainer.save_checkpoint()  # room again: a complete sharded folder that loads
    state = json.loads((run / "step_0000003" / "state.json").read_text())
    assert state["format"] == "sharded" and len(state["sharded"]["files"]) == 1
    resumed = Trainer(config_from_dict(_raw(tmp_path / "run", 3, distributed="ddp")))
    resumed.maybe_resume()
    assert resumed.step == 3
    assert_tensors_close(trainer_state(resumed), trainer_state(trainer))


def test_one_process_under_torchrun_runs_fsdp_and_matches(runs, tmp_path):
    """`torchrun --nproc_per_node 1` with distributed=fsdp really shards (a group of one): the same
    losses as the plain process, and a sharded checkpoint. This is the FSDP path a one-GPU machine runs."""
    join_as_rank(0, 1, free_port())
    try:
        fit(_raw(tmp_path / "run", 4))
    finally:
        leave_process_group_env()
    assert not torch.distributed.is_initialized()  # the trainer closed its group
    assert logged_losses(tmp_path / "run") == pytest.approx(logged_losses(runs / "one"), rel=1e-5, abs=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "step_0000004" / "sharded").is_dir()
