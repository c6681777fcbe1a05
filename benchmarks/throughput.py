"""Training throughput per model size: steps/s, images/s and model FLOPs utilisation (MFU).

    python benchmarks/throughput.py --device cpu --sizes tiny mini S --batch 32 --image-size 28
    python benchmarks/throughput.py --device cuda --sizes S B --batch 256 --image-size 28 --compile both \
        --methods flow_matching self_flow

One training step = the method's draws, forward (Self-Flow: student, and the EMA-shaped teacher to its
layer without gradient), backward and AdamW update, bf16 autocast on CUDA, fp32 on CPU. Compiled: the
method's compute after its draws in one graph (``torch.compile(method.compute, fullgraph=True)``, as the
trainer does). FLOPs are counted analytically (matmuls and attention, ×3 for forward + backward, ×1 for
the teacher's blocks); MFU = achieved FLOP/s ÷ the device's dense bf16 peak (--peak-tflops or known GPUs).
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from harness import cuda_sync, env_threads, timed, write_result
from selfflow.config import ModelConfig
from selfflow.methods import Batch, BatchRandom, FlowMatching
from selfflow.methods.flow_matching import FlowMatchingConfig
from selfflow.methods.self_flow import SelfFlow, SelfFlowConfig
from selfflow.model import DiT, count_parameters

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops(model: DiT, batch: int, layers: int | None = None) -> float:
    """Matmul + attention FLOPs of one forward pass (per-sample time: B conditioning rows); ``layers``:
    only the patch embedding and the first ``layers`` blocks (the Self-Flow teacher's ``stop_after``)."""
    D, N, L = model.hidden_size, model.num_tokens, model.depth
    hidden = model.blocks[0].mlp[0].out_features
    tokens = batch * N
    per_layer = 2 * tokens * D * (3 * D + D + 2 * hidden) + 4 * batch * N * N * D + 2 * batch * D * 6 * D
    embed = 2 * tokens * D * model.patch_size**2 * model.in_channels  # the final linear costs the same
    return L * per_layer + 2 * embed if layers is None else layers * per_layer + embed


def build_method(name: str, model: DiT):
    """Flow matching, or Self-Flow (its defaults: 25 % of tokens at s, γ = 0.8) with a copy of the model
    as its teacher (the trainer's EMA model)."""
    if name == "flow_matching":
        return FlowMatching(FlowMatchingConfig(), model)
    method = SelfFlow(SelfFlowConfig(), model)
    method.bind_teacher(copy.deepcopy(model).eval().requires_grad_(False))
    return method


def step_flops(model: DiT, method, batch: int) -> float:
    """Forward + backward of the student (3× its forward) plus Self-Flow's teacher forward and head."""
    flops = 3 * forward_flops(model, batch)
    if isinstance(method, SelfFlow) and method.uses_teacher:
        D = model.hidden_size
        flops += forward_flops(model, batch, layers=method.teacher_layer) + 3 * 2 * batch * model.num_tokens * 4 * D * D
    return flops


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in BF16_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def measure(size: str, batch: int, image_size: int, channels: int, device: torch.device, compile_model: bool, steps: int,
            method_name: str = "flow_matching", backend: str = "inductor") -> dict:
    torch.manual_seed(0)
    model = DiT(ModelConfig(size=size, image_size=image_size, in_channels=channels, num_classes=10, patch_size=2)).to(device)
    method = build_method(method_name, model).to(device)
    compute = torch.compile(method.compute, fullgraph=True, backend=backend) if compile_model else method.compute
    opt = torch.optim.AdamW(list(model.parameters()) + list(method.parameters()), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, channels, image_size, image_size, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with amp:
            drawn = method.draw(model, Batch(x0, y, BatchRandom(gen, batch, slice(0, batch))))
            loss, _ = compute(model, x0, drawn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, warmup=3 if not compile_model else 5, repeats=steps, sync=cuda_sync() if device.type == "cuda" else None)
    flops = step_flops(model, method, batch)
    row = {
        "method": method_name, "size": size, "params_M": round(count_parameters(model) / 1e6, 2), "tokens": model.num_tokens, "batch": batch,
        "device": str(device), "precision": "bf16" if device.type == "cuda" else "fp32", "compile": backend if compile_model else False,
        "step_ms": round(seconds * 1e3, 2), "steps_per_s": round(1 / seconds, 2), "images_per_s": round(batch / seconds, 1),
        "tflops_per_s": round(flops / seconds / 1e12, 3),
    }
    if device.type == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mini", "S"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager: the tracing without code generation (a CPU smoke run)")
    parser.add_argument("--methods", nargs="+", choices=["flow_matching", "self_flow"], default=["flow_matching"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, for MFU")
    parser.add_argument("--name", default=None, help="result name (default throughput_<device>)")
    args = parser.parse_args()
    env_threads()
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    name = args.name or f"throughput_{device.type}"
    rows = []
    for compiled in modes:  # every uncompiled row first: compiling takes the longest, and a time limit may cut it
        for size in args.sizes:
            for method in args.methods:
                row = measure(size, args.batch, args.image_size, args.channels, device, compiled, args.steps, method, args.compile_backend)
                if peak:
                    row["mfu"] = round(row["tflops_per_s"] / peak, 4)
                fm = [r for r in rows if (r["size"], bool(r["compile"]), r["method"]) == (size, compiled, "flow_matching")]
                if fm:
                    row["x_flow_matching"] = round(row["step_ms"] / fm[0]["step_ms"], 3)
                eager = [r for r in rows if (r["size"], bool(r["compile"]), r["method"]) == (size, False, method)]
                if compiled and eager:
                    row["compiled_over_eager"] = round(row["step_ms"] / eager[0]["step_ms"], 3)
                print(row, flush=True)
                rows.append(row)
                path = write(name, rows, peak, device)  # after every row, so that a cut run keeps what it measured
    print(path)


def write(name: str, rows: list[dict], peak: float | None, device: torch.device):
    columns = ["method", "size", "params_M", "tokens", "batch", "device", "precision", "compile", "step_ms", "steps_per_s", "images_per_s", "tflops_per_s"]
    columns += [c for c in ("x_flow_matching", "compiled_over_eager", "peak_mem_GiB", "mfu") if any(c in r for r in rows)]
    notes = (
        "FLOPs are counted analytically (matmuls + attention, ×3 for forward and backward, ×1 for Self-Flow's teacher "
        "blocks); x_flow_matching: step time over flow matching's at the same size and mode; MFU divides the "
        f"achieved rate by the dense bf16 peak ({peak} TFLOP/s)." if peak else
        "No MFU: the device's bf16 peak is unknown here (CPU); pass --peak-tflops to compute it."
    )
    return write_result(name, rows, columns, f"Training throughput ({device.type})", notes)

if __name__ == "__main__":
    main()
