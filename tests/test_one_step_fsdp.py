"""DMD2 under FSDP2 on two gloo processes: the same losses and weights as one process at the same
global batch, through a sharded checkpoint.

DMD2 is the hard case for sharding: the method owns a whole second DiT (the fake score) and a GAN
head, which live in the FSDP root beside the student's embeddings; on fake-score-only steps the
student's blocks run without gradients, so their units reduce nothing and AdamW skips them; the GAN
generator loss reads the fake score's gathered weights through ``functional_call``; backward
simulation runs each student block several times in one forward.

One spawn of two processes runs two phases (each a fresh Trainer and process group):

    A  fsdp/  steps 0 → 2 (generator steps: 0), writes a sharded checkpoint
    B  fsdp/  resumes it on 2 processes, steps 2 → 4 (generator step: 2)

The reference trains steps 0 → 4 in one process; the sharded step-4 checkpoint is then loaded by a
plain one-process trainer and compared tensor by tensor (student, EMA, fake score, GAN head, AdamW).
"""
import json
import shutil

import pytest
import torch

from selfflow import checkpoint as ckpt
from support import assert_tensors_close, fit, fit_phases, free_port, logged_losses, spawn_ranks, tiny_run, trainer_state


def _raw(out_dir, teacher, steps, distributed):
    method = {"name": "dmd2", "teacher": str(teacher), "fake_updates_per_generator": 2, "generator_steps": 2,
              "backward_simulation": True, "gan_generator_weight": 0.1, "gan_discriminator_weight": 0.1}
    return tiny_run(out_dir, method=method, train={"steps": steps, "warmup_steps": 1, "ckpt_every": 2, "keep_last": 3,
                                                  "init_from": str(teacher), "distributed": distributed})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd_fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(tiny_run(root / "teacher", train={"steps": 2}))
        fit(_raw(root / "one", root / "teacher", 4, "ddp"))  # the 1-process reference (no process group)
    finally:
        torch.set_num_threads(threads)
    phases = [(free_port(), _raw(root / "fsdp", root / "teacher", 2, "fsdp")),
              (free_port(), _raw(root / "fsdp", root / "teacher", 4, "fsdp"))]
    spawn_ranks(fit_phases, 2, 2, phases)
    return root


def test_dmd2_under_fsdp_matches_one_process(runs):
    one, two = logged_losses(runs / "one"), logged_losses(runs / "fsdp")
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    records = [json.loads(line) for line in (runs / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert ["loss_dmd" in r for r in records] == [True, False, True, False]  # generator steps 0 and 2 only
    assert all("loss_gan_d" in r and "loss_fake" in r for r in records)
    reference = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records, reference):
        for key in ("loss_fake", "loss_dmd", "loss_gan_d", "loss_gan_g", "grad_norm"):
            assert (key in a) == (key in b) and a.get(key, 0) == pytest.approx(b.get(key, 0), rel=1e-4, abs=1e-6), key
    step = runs / "fsdp" / "checkpoints" / "step_0000004"
    state = json.loads((step / "state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2 and len(state["sharded"]["files"]) == 2
    ema_one = ckpt.load_tensors(runs / "one" / "checkpoints" / "step_0000004" / "ema.safetensors")
    assert_tensors_close(ckpt.load_tensors(step / "ema.safetensors"), ema_one)


def test_sharded_dmd2_checkpoint_holds_the_reference_weights_and_optimizer(runs, tmp_path):
    """The 2-process step-4 checkpoint, loaded by a plain one-process trainer: every tensor (student,
    EMA, fake score, GAN head, AdamW moments) equals the one-process run's."""
    for name in ("fsdp", "one"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(runs / name / "checkpoints" / "step_0000004", tmp_path / name / "checkpoints" / "step_0000004")
    two = fit(_raw(tmp_path / "fsdp", runs / "teacher", 4, "ddp"))  # resumes at step 4: nothing left to train
    one = fit(_raw(tmp_path / "one", runs / "teacher", 4, "ddp"))
    assert two.step == one.step == 4
    a, b = trainer_state(two), trainer_state(one)
    assert_tensors_close(a, b)
    assert any(k.startswith("method.fake.") for k in a) and any(k.startswith("method.gan_head.") for k in a)
    for p, q in zip(two.params, one.params):
        assert_tensors_close(two.optimizer.state[p], one.optimizer.state[q])
    # AdamW skipped the student on the fake-only steps 1 and 3 (its gradients were None on both processes)
    model_params = {id(p) for p in two.model.parameters()}
    assert {float(two.optimizer.state[p]["step"]) for p in two.params if id(p) in model_params} == {2.0}
    assert {float(two.optimizer.state[p]["step"]) for p in two.params if id(p) not in model_params} == {4.0}
    teacher = ckpt.load_tensors(ckpt.latest_checkpoint(runs / "teacher" / "checkpoints") / "ema.safetensors")
    assert any(not torch.equal(a[f"model.{k}"], v) for k, v in teacher.items())  # the generator trained
