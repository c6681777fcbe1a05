"""Probes of a frozen encoder on real labelled images (docs/methods.md#stablerep).

Features are the encoder's output (before the head), computed without augmentation.

``linear``   multinomial logistic regression on standardised features (train-split mean and std),
             full-batch AdamW for ``epochs`` epochs from zero weights: deterministic.
``knn``      cosine k-nearest neighbours of each test image among the train images, votes weighted
             by exp(cos / τ) (the InstDisc/DINO protocol).
``few-shot`` the linear probe trained on k labelled images per class (k = 1, 5, 10), drawn at random
             ``trials`` times from the train split (seeded); the mean and spread of the accuracies.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from selfflow.checkpoint import load_state_strict, load_tensors, resolve_checkpoint
from selfflow.config import ProbeConfig, config_from_dict
from selfflow.errors import CheckpointError
from selfflow.imageio import uint8_to_float
from selfflow.represent.encoders import build_encoder


def load_encoder(path: str | Path, weights: str = "model", device="cpu") -> tuple[torch.nn.Module, Path, dict]:
    """The encoder of a representation run's checkpoint (a checkpoint, or a run folder: its newest)."""
    folder = resolve_checkpoint(path)
    try:
        run = json.loads((folder / "config.json").read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{folder / 'config.json'}: not a training checkpoint's config") from None
    config = config_from_dict(run, str(folder / "config.json"))
    if not hasattr(config.method, "encoder"):
        raise CheckpointError(f"{folder}: a {config.method_name()} checkpoint, not an encoder (selfflow represent train)")
    encoder = build_encoder(config)
    file = folder / f"{weights}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    load_state_strict(encoder, load_tensors(file), file)
    return encoder.to(device).eval().requires_grad_(False), folder, run


@torch.no_grad()
def extract_features(encoder, images: torch.Tensor, batch_size: int = 512, device="cpu") -> torch.Tensor:
    """uint8 images (N, C, H, W) → float32 features (N, F) on the CPU."""
    out = []
    for lo in range(0, len(images), batch_size):
        out.append(encoder(uint8_to_float(images[lo : lo + batch_size]).to(device)).float().cpu())
    return torch.cat(out)


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, epochs: int = 100, lr: float = 0.01,
                 weight_decay: float = 1e-4) -> float:
    """Test accuracy of a logistic regression trained on (train_x, train_y); see the module doc."""
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1])
    a, b = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(a.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            F.cross_entropy(a @ weight + bias, train_y).backward()
            optimizer.step()
    with torch.no_grad():
        return float(((b @ weight + bias).argmax(1) == test_y).float().mean())


def knn_probe(train_x, train_y, test_x, test_y, num_classes: int, *, k: int = 20, temperature: float = 0.07) -> float:
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    correct = 0
    for lo in range(0, len(b), 1024):
        sim = b[lo : lo + 1024] @ a.T
        top, index = sim.topk(min(k, len(a)), dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[index], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_y[lo : lo + 1024]).sum())
    return correct / len(b)


def few_shot(train_x, train_y, test_x, test_y, num_classes: int, shots: int, *, trials: int, seed: int, **probe) -> dict:
    """Linear-probe accuracy with ``shots`` labelled train images per class: mean, std and each trial."""
    scores = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(seed * 1000 + shots * 100 + trial)
        chosen = []
        for c in range(num_classes):
            rows = (train_y == c).nonzero().flatten()
            chosen.append(rows[torch.randperm(len(rows), generator=g)[:shots]])
        rows = torch.cat(chosen)
        scores.append(linear_probe(train_x[rows], train_y[rows], test_x, test_y, num_classes, **probe))
    t = torch.tensor(scores)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "trials": scores}


def run_probes(encoder, train, test, config: ProbeConfig, device="cpu") -> dict:
    """Every probe of ``config`` for ``encoder`` on the ImageDatasets ``train`` and ``test``."""
    train_x = extract_features(encoder, train.images, device=device)
    test_x = extract_features(encoder, test.images, device=device)
    n = train.num_classes
    probe = {"epochs": config.epochs, "lr": config.lr, "weight_decay": config.weight_decay}
    result = {
        "linear": linear_probe(train_x, train.labels, test_x, test.labels, n, **probe),
        "knn": knn_probe(train_x, train.labels, test_x, test.labels, n, k=config.knn_k, temperature=config.knn_temperature),
        "few_shot": {str(k): few_shot(train_x, train.labels, test_x, test.labels, n, k, trials=config.few_shot_trials,
                                      seed=config.seed, **probe) for k in config.few_shot},
        "train_images": len(train), "test_images": len(test), "feature_dim": int(train_x.shape[1]),
    }
    return result
