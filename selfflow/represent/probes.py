"""Probes of a frozen encoder on real labelled images (docs/methods.md#stablerep).

Features are the encoder's output (before the head), computed without augmentation.

``linear``   multinomial logistic regression on standardised features (train-split mean and std),
             fitted by full-batch L-BFGS from zero weights to convergence (gradient norm below
             ``tolerance`` or ``max_iter`` iterations; the result records which): deterministic. The L2
             strength λ of  mean CE + λ/2·‖W‖²  is chosen from ``weight_decays`` on a held-out part of the
             train split (a seeded ``holdout`` share); the probe is then refitted on the whole train
             split with that λ and scored once on test. The test split takes no part in the choice.
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


WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(train_x, *others) standardised with the mean and std of ``train_x`` (per feature)."""
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False).clamp_min(1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1])
    return [(x - mean) / std for x in (train_x, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *, max_iter: int = 1000,
                 tolerance: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight (F, K), bias (K,), iterations) minimising mean CE(x W + b, y) + weight_decay/2 · ‖W‖² by L-BFGS
    (strong-Wolfe line search) from zero, in float64."""
    x = x.double()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tolerance,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    return weight.detach(), bias.detach(), iterations


def _accuracy(weight, bias, x, y) -> float:
    return float(((x.double() @ weight + bias).argmax(1) == y).float().mean())


def select_weight_decay(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, weight_decays=WEIGHT_DECAYS,
                        holdout: float = 0.1, seed: int = 0, max_iter: int = 1000) -> dict:
    """The λ of ``weight_decays`` with the best accuracy on a held-out part of the train split (ties: the larger λ).

    ``train_x`` is standardised already. Takes no test data, by construction."""
    n = len(train_x)
    if len(weight_decays) == 1 or n < 10:
        return {"weight_decay": float(weight_decays[-1] if n < 10 else weight_decays[0]), "holdout_accuracy": {}}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(holdout * n)))
    fit, check = order[held:], order[:held]
    scores = {}
    for wd in weight_decays:
        weight, bias, _ = fit_logistic(train_x[fit], train_y[fit], num_classes, wd, max_iter=max_iter)
        scores[float(wd)] = _accuracy(weight, bias, train_x[check], train_y[check])
    best = max(scores, key=lambda wd: (scores[wd], wd))
    return {"weight_decay": best, "holdout_accuracy": scores, "holdout_images": held}


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, weight_decays=WEIGHT_DECAYS, holdout: float = 0.1,
                 seed: int = 0, max_iter: int = 1000) -> dict:
    """The linear probe of the module doc: λ chosen on held-out train images, refitted on all of train, scored on test.

    Returns ``accuracy`` (test), the chosen ``weight_decay``, the held-out accuracy of every λ, the
    refit's L-BFGS ``iterations`` and whether it ``converged`` (stopped before ``max_iter``)."""
    a, b = standardise(train_x.float(), test_x.float())
    chosen = select_weight_decay(a, train_y, num_classes, weight_decays=weight_decays, holdout=holdout, seed=seed,
                                 max_iter=max_iter)
    weight, bias, iterations = fit_logistic(a, train_y, num_classes, chosen["weight_decay"], max_iter=max_iter)
    return {"accuracy": _accuracy(weight, bias, b, test_y), **chosen, "iterations": iterations,
            "converged": iterations < max_iter}


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
    """Linear-probe accuracy with ``shots`` labelled train images per class: mean, std and each trial
    (``probe``: the settings of :func:`linear_probe`; give one weight decay, there is nothing to hold out)."""
    scores = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(seed * 1000 + shots * 100 + trial)
        chosen = []
        for c in range(num_classes):
            rows = (train_y == c).nonzero().flatten()
            chosen.append(rows[torch.randperm(len(rows), generator=g)[:shots]])
        rows = torch.cat(chosen)
        scores.append(linear_probe(train_x[rows], train_y[rows], test_x, test_y, num_classes, **probe)["accuracy"])
    t = torch.tensor(scores)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "trials": scores}


def run_probes(encoder, train, test, config: ProbeConfig, device="cpu") -> dict:
    """Every probe of ``config`` for ``encoder`` on the ImageDatasets ``train`` and ``test``."""
    train_x = extract_features(encoder, train.images, device=device)
    test_x = extract_features(encoder, test.images, device=device)
    n = train.num_classes
    settings = {"holdout": config.holdout, "seed": config.seed, "max_iter": config.max_iter}
    linear = linear_probe(train_x, train.labels, test_x, test.labels, n, weight_decays=config.weight_decays, **settings)
    few = {"weight_decays": (linear["weight_decay"],), "max_iter": config.max_iter}  # λ chosen on train, never on test
    result = {
        "linear": linear["accuracy"],
        "linear_selection": {k: v for k, v in linear.items() if k != "accuracy"},
        "knn": knn_probe(train_x, train.labels, test_x, test.labels, n, k=config.knn_k, temperature=config.knn_temperature),
        "few_shot": {str(k): few_shot(train_x, train.labels, test_x, test.labels, n, k, trials=config.few_shot_trials,
                                      seed=config.seed, **few) for k in config.few_shot},
        "train_images": len(train), "test_images": len(test), "feature_dim": int(train_x.shape[1]),
    }
    return result


def raw_pixel_probes(train, test, config: ProbeConfig) -> dict:
    """The same probes with the pixels (in [−1, 1], flattened) as the features: the baseline an encoder must beat."""
    return run_probes(torch.nn.Flatten(), train, test, config)
