"""Pieces several test files share: the tiny run every trainer test uses, and the set-up of the
worker processes that the multi-process tests spawn (one torch thread each: two cores)."""
import copy
import json
import os
import sys
import socket
from pathlib import Path

import torch

# Local copies of files the project cannot download in a test: a developer puts them in the
# repository's .carry/ (ignored by git; DEVELOPERS.md) or names them with environment variables.
# Tests that need them are skipped when they are absent.
REPO = Path(__file__).resolve().parents[1]
LOCAL_MNIST = Path(os.environ.get("SELFFLOW_MNIST") or REPO / ".carry" / "mnist")
LOCAL_INCEPTION = Path(os.environ.get("SELFFLOW_INCEPTION") or REPO / ".carry" / "fid_inception_v3_fp16.pt")

# digits 8×8, a depth-2 width-64 DiT, CPU, no progress bars, no samples, no checkpoints by default
TINY_RUN = {
    "data": {"name": "digits"},
    "model": {"size": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4},
    "method": {"name": "flow_matching"},
    "train": {
        "steps": 6, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "ckpt_every": 0,
        "num_sample_images": 0, "progress": False, "tensorboard": False, "device": "cpu",
    },
    "sample": {"steps": 4},
}


def one_line_error(capsys, *needles) -> str:
    """The CLI's stderr is exactly one ``selfflow: error:`` line (no traceback) holding every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfflow: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tiny_run(out_dir, **sections) -> dict:
    """The raw (YAML-shaped) config of :data:`TINY_RUN` writing to ``out_dir``; each keyword is a
    section whose keys replace the defaults, e.g. ``tiny_run(out, train={"steps": 2})``."""
    raw = copy.deepcopy(TINY_RUN)
    raw["train"]["out_dir"] = str(out_dir)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def train_config(config):
    """Build a Trainer from a RunConfig, train it to the end, close it; returns (trainer, fit's result)."""
    from selfflow.trainer import Trainer

    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    return trainer, result


def fit(raw):
    """:func:`train_config` of a raw (YAML-shaped) config; returns the trainer."""
    from selfflow.config import config_from_dict

    return train_config(config_from_dict(raw))[0]


def logged_losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, world: int, port: int) -> None:
    """What torchrun would set for this process; plus one torch thread (two processes, two cores)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def _rank_main(rank: int, worker, world: int, args: tuple) -> None:
    worker(rank, *args)
    # Leave without interpreter finalisation: gloo's worker threads can still hold tensors of a
    # group that is only freed then, and freeing them during finalisation aborts the process
    # (SIGABRT) after all its work is done. A failure above still raises as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, world: int, *args) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes and wait for all of them."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(worker, world, args), nprocs=world, join=True, start_method="spawn")


def fit_phases(rank: int, world: int, phases) -> None:
    """A spawned rank's work: each (port, raw config) phase as a fresh process group and trainer."""
    for port, raw in phases:
        join_as_rank(rank, world, port)
        fit(raw)


def trainer_state(trainer) -> dict:
    """Every weight a checkpoint restores: the model, its EMA and the method's own networks."""
    return {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()},
            **{f"method.{k}": v for k, v in trainer.method.state_dict().items()}}


def assert_tensors_close(a: dict, b: dict) -> None:
    """Same keys, values equal to float tolerance (processes reduce in another order)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def leave_process_group_env() -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


def perturbed_dit(scale: float = 0.05, **overrides):
    """A small DiT (8×8×1 digits-shaped by default) whose weights are all nudged off their
    initialisation by ``scale``·N(0, 1) (seed 0): adaLN-Zero starts with zero output, which would
    make comparisons vacuous."""
    from selfflow.config import ModelConfig
    from selfflow.model import DiT

    cfg = dict(size="tiny", depth=3, hidden_size=64, num_heads=4, image_size=8, in_channels=1, num_classes=10)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = DiT(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model
