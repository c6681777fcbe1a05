"""A 2-process gloo DDP run equals a 1-process run at the same global batch (float tolerance)."""
import pytest
import torch

from selfflow import checkpoint as ckpt
from support import fit, free_port, join_as_rank, leave_process_group_env, logged_losses, spawn_ranks, tiny_run


def _worker(rank, world, port, raw):
    join_as_rank(rank, world, port)
    fit(raw)


def _train(world, raw):
    """Train ``raw`` in this process (world 1) or in ``world`` spawned gloo processes."""
    if world == 1:
        _worker(0, 1, free_port(), raw)
        leave_process_group_env()
    else:
        spawn_ranks(_worker, world, world, free_port(), raw)


def _run(world, out_dir, steps=4):
    _train(world, tiny_run(out_dir, train={"steps": steps, "warmup_steps": 1}))
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints")
    return ckpt.load_tensors(latest / "model.safetensors"), logged_losses(out_dir)


def test_two_process_ddp_matches_one_process(tmp_path):
    threads = torch.get_num_threads()
    try:
        single, single_losses = _run(1, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    double, double_losses = _run(2, tmp_path / "two")
    assert single_losses == pytest.approx(double_losses, rel=1e-5, abs=1e-6)
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def _dmd2_run(world, out_dir, teacher):
    method = {"name": "dmd2", "teacher": str(teacher), "fake_updates_per_generator": 2}
    _train(world, tiny_run(out_dir, method=method, train={"steps": 4, "warmup_steps": 1, "init_from": str(teacher)}))
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints")
    tensors = {f"model.{k}": v for k, v in ckpt.load_tensors(latest / "model.safetensors").items()}
    tensors.update({f"method.{k}": v for k, v in ckpt.load_tensors(latest / "method.safetensors").items()})
    return tensors, logged_losses(out_dir)


def test_two_process_dmd2_with_fake_only_steps_matches_one_process(tmp_path):
    """DMD2's fake-score-only steps leave the generator without gradients; under DDP that needs
    find_unused_parameters, and the generator must still move only on its own steps."""
    threads = torch.get_num_threads()
    try:
        fit(tiny_run(tmp_path / "teacher", train={"steps": 2}))
        single, single_losses = _dmd2_run(1, tmp_path / "one", tmp_path / "teacher")
    finally:
        torch.set_num_threads(threads)
    double, double_losses = _dmd2_run(2, tmp_path / "two", tmp_path / "teacher")
    assert single_losses == pytest.approx(double_losses, rel=1e-5, abs=1e-6)
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    teacher = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "teacher" / "checkpoints") / "ema.safetensors")
    assert any(not torch.equal(single[f"model.{k}"], v) for k, v in teacher.items())  # the generator trained
