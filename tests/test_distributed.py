"""A 2-process gloo DDP run equals a 1-process run at the same global batch (float tolerance)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from selfflow import checkpoint as ckpt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(out_dir, steps):
    return {
        "data": {"name": "digits"},
        "model": {"size": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4},
        "method": {"name": "flow_matching"},
        "train": {
            "steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0,
            "num_sample_images": 0, "out_dir": str(out_dir), "progress": False, "tensorboard": False, "device": "cpu",
        },
    }


def _worker(rank, world, port, raw):
    torch.set_num_threads(1)  # two processes on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from selfflow.config import config_from_dict
    from selfflow.trainer import Trainer

    trainer = Trainer(config_from_dict(raw))
    try:
        trainer.fit()
    finally:
        trainer.close()


def _run(world, out_dir, steps=4):
    raw = _raw(out_dir, steps)
    if world == 1:
        _worker(0, 1, _free_port(), raw)
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
    else:
        mp.start_processes(_worker, args=(world, _free_port(), raw), nprocs=world, join=True, start_method="spawn")
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints")
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return ckpt.load_tensors(latest / "model.safetensors"), losses


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
