"""Checkpoint files: atomic writes, clear errors, no code execution on load."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from selfflow import checkpoint as ckpt


def test_tensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    ckpt.save_tensors(tensors, tmp_path / "t.safetensors")
    back = ckpt.load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_truncated_safetensors_gives_clear_error(tmp_path):
    ckpt.save_tensors({"a": torch.randn(100, 100)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"t\.safetensors: not a readable safetensors file"):
        ckpt.load_tensors(tmp_path / "t.safetensors")


def test_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"w": Evil()}))
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_tensors(tmp_path / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="refusing to load a non-safetensors file"):
        ckpt.load_tensors(tmp_path / "model.pt")
    assert not marker.exists()


def test_corrupt_json_names_the_file(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 3')
    with pytest.raises(ckpt.CheckpointError, match=r"state\.json: not valid JSON"):
        ckpt.read_json(tmp_path / "state.json")


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = ckpt.split_optimizer_state(opt.state_dict())
    back = ckpt.join_optimizer_state(tensors, rest)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back)
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)


def test_atomic_directory_failure_keeps_old_version(tmp_path):
    target = tmp_path / "step_0000001"
    with ckpt.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]


def test_unwritable_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")  # a file where a folder should be: fails even for root
        target = blocker / "ckpt"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "ckpt"
    with pytest.raises(ckpt.CheckpointError, match="cannot write to"):
        with ckpt.atomic_directory(target):
            pass


def test_killed_writer_leaves_last_good_checkpoint(tmp_path):
    """SIGKILL a process in the middle of writing a checkpoint folder: the old one stays newest."""
    root = tmp_path / "checkpoints"
    with ckpt.atomic_directory(root / ckpt.step_dir_name(1)) as tmp:
        ckpt.save_tensors({"w": torch.ones(3)}, tmp / "model.safetensors")
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from selfflow import checkpoint as ckpt
        with ckpt.atomic_directory({str(root / ckpt.step_dir_name(2))!r}) as tmp:
            ckpt.save_tensors({{"w": torch.zeros(1000, 1000)}}, tmp / "model.safetensors")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == ckpt.step_dir_name(1)
    assert torch.equal(ckpt.load_tensors(latest / "model.safetensors")["w"], torch.ones(3))
    ckpt.remove_stale_temporaries(root)
    assert [p.name for p in root.iterdir()] == [ckpt.step_dir_name(1)]


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        (tmp_path / ckpt.step_dir_name(step)).mkdir()
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.step_dir_name(4), ckpt.step_dir_name(5)]
