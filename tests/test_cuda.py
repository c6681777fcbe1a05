"""The CUDA path: the same code as on the CPU, checked against the CPU where it must agree.

Skipped without a GPU (CI has none); `bash benchmarks/gpu_suite.sh extra` runs this file on a lent GPU.
Tolerances follow the arithmetic: float32 on the GPU (cuDNN may use TF32 for the patch
convolution) within 1e-2 relative of the CPU; bf16 autocast within a few per cent of float32.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

from support import fit, logged_losses, perturbed_dit, tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_dit_on_cuda_matches_cpu_fp32_and_bf16():
    model = perturbed_dit(image_size=28)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    t_tokens = torch.rand(8, 196, generator=g)  # per-token times, as Self-Flow gives them
    with torch.no_grad():
        reference = model(x, t_tokens, y)
        gpu = model.cuda()
        fp32 = gpu(x.cuda(), t_tokens.cuda(), y.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(x.cuda(), t_tokens.cuda(), y.cuda())
    assert relative_error(fp32, reference) < 1e-2
    assert relative_error(bf16.float(), reference) < 5e-2
    assert torch.isfinite(bf16).all()


@pytest.mark.parametrize("method", [{"name": "flow_matching"}, {"name": "self_flow"}, {"name": "self_flow", "rep_weight": 0.0}])
def test_bf16_training_on_cuda_lowers_the_loss(tmp_path, method):
    raw = tiny_run(tmp_path / "run", method=method, train={"steps": 60, "device": "cuda", "precision": "bf16", "lr": 2e-3, "warmup_steps": 5})
    fit(raw)
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_cuda_resume_continues_the_run(tmp_path):
    """Stop at step 3, resume to 6: the weights match the uninterrupted run (CUDA kernels may differ
    in the last bits between launches, so within a tolerance, not bit for bit)."""
    from selfflow import checkpoint as ckpt

    train = {"steps": 6, "device": "cuda", "precision": "bf16", "ckpt_every": 3}
    fit(tiny_run(tmp_path / "whole", method={"name": "self_flow"}, train=train))
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_0000003", resumed / "step_0000003")
    fit(tiny_run(tmp_path / "resumed", method={"name": "self_flow"}, train=train))
    for name in ("model.safetensors", "ema.safetensors", "method.safetensors"):
        a = ckpt.load_tensors(tmp_path / "whole" / "checkpoints" / "step_0000006" / name)
        b = ckpt.load_tensors(resumed / "step_0000006" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=f"{name}:{key}")


def test_generate_on_cuda_does_not_depend_on_the_batch():
    from selfflow.sampling import generate

    model = perturbed_dit(image_size=8).cuda()
    common = dict(num_samples=6, image_shape=(1, 8, 8), seeds=[5, 6, 7, 8, 9, 10], sampler="sde", steps=6, cfg_scale=1.5,
                  device="cuda", progress=False)
    a = generate(model, batch_size=6, **common)
    b = generate(model, batch_size=4, **common)
    c = generate(model.cpu(), batch_size=6, **{**common, "device": "cpu"})
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
    assert relative_error(a.images, c.images) < 1e-2


def _inception_file() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for candidate in (os.environ.get("SELFFLOW_INCEPTION"), here / ".carry" / "fid_inception_v3_fp16.pt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def test_inception_features_on_cuda_match_cpu():
    from selfflow.data import load_dataset
    from selfflow.evaluation import FeatureStats, load_inception

    path = _inception_file()
    if path is None:
        pytest.skip("no Inception weight file (.carry/fid_inception_v3_fp16.pt or $SELFFLOW_INCEPTION)")
    images = load_dataset("digits", split="train").get_batch(torch.arange(256))[0]
    cpu = load_inception(path, "cpu").features(images[:32])
    gpu = load_inception(path, "cuda")
    assert relative_error(gpu.features(images[:32]).cpu(), cpu) < 1e-2
    # FID between two halves, both ways: the GPU figure agrees with the CPU one to 1 %.
    fids = []
    for net in (load_inception(path, "cpu"), gpu):
        feats = net.features(images).cpu().double().numpy()
        fids.append(FeatureStats.from_features(feats[:128]).frechet_distance(FeatureStats.from_features(feats[128:])))
    assert abs(fids[1] - fids[0]) / fids[0] < 1e-2


def test_fsdp_with_nccl_and_bf16_on_one_gpu(tmp_path):
    """torchrun --nproc_per_node 1 with distributed=fsdp: NCCL, fully_shard with bf16 parameters,
    a sharded checkpoint that a plain process (no group) resumes; losses near the unsharded run's."""
    from support import free_port, join_as_rank, leave_process_group_env

    train = {"steps": 20, "device": "cuda", "precision": "bf16", "lr": 2e-3, "warmup_steps": 2, "ckpt_every": 10}
    fit(tiny_run(tmp_path / "plain", method={"name": "self_flow"}, train=train))
    join_as_rank(0, 1, free_port())
    try:
        fit(tiny_run(tmp_path / "fsdp", method={"name": "self_flow"}, train={**train, "distributed": "fsdp"}))
    finally:
        leave_process_group_env()
    assert (tmp_path / "fsdp" / "checkpoints" / "step_0000020" / "sharded").is_dir()
    plain, sharded = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "fsdp")
    assert all(torch.isfinite(torch.tensor(sharded)))
    assert relative_error(torch.tensor(sharded), torch.tensor(plain)) < 5e-2  # bf16 parameters vs autocast
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step_0000020")
    fit(tiny_run(tmp_path / "fsdp", method={"name": "self_flow"}, train=train))  # resumes step 10's shards, no group
    assert len(logged_losses(tmp_path / "fsdp")) == 30  # 20 sharded + 10 resumed
