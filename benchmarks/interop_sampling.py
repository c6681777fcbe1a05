"""An imported network sampled with our ODE samplers and with the authors' SDE sampler (sit_sde).

    python benchmarks/interop_sampling.py --steps 2500 --n 1000

1. Trains a tiny class-conditional DiT on the 8×8 digits with SiT's time embedding (τ = 1 − t:
   ``model.time_scale=-1``, ``model.time_shift=1``), so that its weights can be written in SiT's layout.
2. Writes its EMA weights as a SiT training checkpoint (``{"model", "ema", "opt", "args": Namespace}``,
   learned-sigma head, SiT's sign and time convention) with ``selfflow.interop.export_state``, and
   imports that file back with ``selfflow.interop.import_checkpoint`` (the safe loader); checks the
   imported velocity equals the trained model's.
3. Sweeps Euler, Heun, dopri5 and ``sit_sde`` (the published sampler, last step 0.04) at several
   evaluation budgets, same seeds and labels, scoring FD_dom (classifier features, digits test split)
   and reports, per sampler, the fewest evaluations per image reaching the quality of ``sit_sde`` at
   its published 250 evaluations (within 5 %).
"""
from __future__ import annotations

import argparse
import argparse as _argparse
import time
from pathlib import Path

import torch

from harness import DOCS, env_threads, write_result
from selfflow.config import config_from_dict
from selfflow.data import load_dataset
from selfflow.evaluation import FeatureStats, extract_features
from selfflow.evaluation.feature_net import train_feature_net
from selfflow.interop import export_state, import_checkpoint
from selfflow.model import DiT, load_generator
from selfflow.sampling import generate
from selfflow.trainer import Trainer

ODE_STEPS = [2, 4, 8, 16, 32]
SIT_STEPS = [4, 8, 16, 32, 64, 250]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/interop_sampling")
    parser.add_argument("--steps", type=int, default=2500, help="training steps of the tiny model")
    parser.add_argument("--n", type=int, default=1000, help="generated images per point")
    parser.add_argument("--name", default="interop_sampling_digits_cpu")
    args = parser.parse_args()
    env_threads()
    work = Path(args.work)

    run = {
        "data": {"name": "digits"},
        "model": {"size": "tiny", "depth": 4, "hidden_size": 64, "num_heads": 4, "time_scale": -1.0, "time_shift": 1.0},
        "method": {"name": "flow_matching", "class_dropout_prob": 0.1},
        "train": {"steps": args.steps, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999, "seed": 0,
                  "device": "cpu", "precision": "fp32", "out_dir": str(work / "train"), "log_every": 500, "ckpt_every": args.steps,
                  "num_sample_images": 0, "progress": False, "tensorboard": False},
        "sample": {"sampler": "heun", "steps": 20},
    }
    start = time.perf_counter()
    if not (work / "train" / "checkpoints").exists():
        trainer = Trainer(config_from_dict(run))
        try:
            trainer.fit()
        finally:
            trainer.close()
    train_s = time.perf_counter() - start
    trained, _ = load_generator(work / "train", "ema")

    # the SiT training checkpoint, then the import
    sit_file = work / "sit_layout.pt"
    state = export_state(trained, "sit", learned_sigma=True)
    namespace = _argparse.Namespace(model="tiny", image_size=8, num_classes=10, learn_sigma=True, path_type="Linear")
    torch.save({"model": state, "ema": state, "opt": {}, "args": namespace}, sit_file)
    import_checkpoint(sit_file, "sit", work / "imported", num_heads=4, latent=False)
    model = DiT.from_pretrained(work / "imported").eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, generator=g), torch.arange(8)
    with torch.no_grad():
        import_error = (model(x, t, y) - trained(x, t, y)).abs().max().item()

    train_set, test_set = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    x_train, y_train = train_set.get_batch(torch.arange(len(train_set)))
    x_ref, _ = test_set.get_batch(torch.arange(len(test_set)))
    net = train_feature_net(x_train, y_train, train_set.num_classes, steps=800, seed=0, device="cpu")
    reference = FeatureStats.from_features(extract_features(net, x_ref))
    floor_n = min(args.n, len(x_train))
    floor = FeatureStats.from_features(extract_features(net, x_train[:floor_n])).frechet_distance(reference)

    def score(sampler: str, steps: int) -> dict:
        result = generate(model, num_samples=args.n, seeds=list(range(args.n)), sampler=sampler, steps=steps, batch_size=1000,
                          image_shape=(1, 8, 8), progress=False)
        fd = FeatureStats.from_features(extract_features(net, result.images)).frechet_distance(reference)
        row = {"sampler": sampler, "steps": steps, "nfe_per_image": result.nfe_per_sample, "fd_dom": round(fd, 4),
               "ms_per_image": round(1e3 * result.wall_time_s / args.n, 4)}
        print(row, flush=True)
        return row

    rows = [score(s, k) for s in ("euler", "heun") for k in ODE_STEPS] + [score("dopri5", 2)]
    rows += [score("sit_sde", k) for k in SIT_STEPS]
    target = 1.05 * next(r["fd_dom"] for r in rows if r["sampler"] == "sit_sde" and r["steps"] == 250)
    equal = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        reached = [r for r in rows if r["sampler"] == sampler and r["fd_dom"] <= target]
        best = min(reached, key=lambda r: r["nfe_per_image"]) if reached else None
        equal.append({"sampler": sampler, "nfe_to_reach_target": best["nfe_per_image"] if best else None,
                      "fd_dom_there": best["fd_dom"] if best else None})
    notes = (
        f"Model: a tiny DiT (depth 4, width 64, 0.33M parameters) trained {args.steps} steps on the 8×8 digits with SiT's time "
        f"embedding ({train_s:.0f} s), written as a SiT training checkpoint (learned sigma, SiT time and sign, argparse Namespace) "
        f"and imported with `selfflow.interop.import_checkpoint`: max |v_imported − v_trained| = {import_error:.2e} on random inputs. "
        f"FD_dom: classifier features, n = {args.n} generated (seeds 0..{args.n - 1}, labels = seed mod 10, guidance 1) vs the "
        f"digits test split; real-data floor {floor:.4f}. `sit_sde` steps = evaluations (n − 1 Euler–Maruyama steps on "
        f"linspace(1, 0.04, n), then the mean step; 250 = the published setting); dopri5: rtol = atol = 1e-5, its own steps. "
        f"Equal quality: target = 1.05 × FD_dom of sit_sde at 250 evaluations = {target:.4f}.\n\n"
        "| sampler | evaluations per image to reach the target | FD_dom there |\n|---|---|---|\n"
        + "\n".join(f"| {e['sampler']} | {e['nfe_to_reach_target'] if e['nfe_to_reach_target'] is not None else 'not reached'} | "
                    f"{e['fd_dom_there'] if e['fd_dom_there'] is not None else '—'} |" for e in equal)
    )
    path = write_result(args.name, rows, ["sampler", "steps", "nfe_per_image", "fd_dom", "ms_per_image"],
                        "An imported SiT-layout network: ODE samplers vs the published SDE sampler", notes,
                        extra={"equal_quality": equal, "target_fd_dom": target, "real_floor_fd_dom": floor,
                               "import_max_abs_error": import_error, "train_seconds": train_s})
    plot(rows, floor, target, DOCS / f"{args.name}.png")
    print(path)


def plot(rows: list[dict], floor: float, target: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe_per_image"], r["fd_dom"]) for r in rows if r["sampler"] == sampler)
        ax.plot(*zip(*pts), marker="o", label=sampler)
    ax.axhline(floor, color="grey", linestyle="--", label="real data floor")
    ax.axhline(target, color="black", linestyle=":", label="1.05 × sit_sde@250")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("FD_dom (lower is better)")
    ax.set_title("imported SiT-layout tiny DiT, digits 8×8")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
