"""One-step generation on captions (the InstaFlow setting): pairs generated from prompts by a
caption-conditioned teacher, reflow / distillation / DMD of a caption-conditioned student on them,
one-step sampling from prompts, and the one-line errors of mixing label and caption parts."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from selfflow.cli import main
from selfflow.config import ModelConfig, config_from_dict
from selfflow.data.pairs import load_pairs
from selfflow.methods import Batch, BatchRandom
from selfflow.methods.one_step import euler_steps
from selfflow.model import DiT
from selfflow.sampling import noise_for_seeds
from selfflow.sets import generate_set
from selfflow.text.data import make_encoder
from selfflow.text.model import load_text_generator
from support import REPO, TINY_RUN, one_line_error, train_config

PROMPTS = ["a thin seven", "the digit 3, bold strokes, slanted right", "number 1"]


def text_raw(tmp_path, out, method: str, steps: int, data=None, hashed_dim: int = 32, **train) -> dict:
    raw = copy.deepcopy(TINY_RUN)
    raw["method"] = dict(method) if isinstance(method, dict) else {"name": method}
    raw["text"] = {"encoder": "hashed", "hashed_dim": hashed_dim, "captions_per_image": 2, "cache_dir": str(tmp_path / "cache")}
    raw["train"].update({"out_dir": str(out), "steps": steps, "batch_size": 6, **train})
    if data is not None:
        raw["data"] = data
    return raw


@pytest.fixture(scope="module")
def teacher_and_pairs(tmp_path_factory):
    """A tiny caption-conditioned teacher (flow matching, 8 steps) and 6 pairs from 3 prompts made by the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("text_one_step")
    train_config(config_from_dict(text_raw(root, root / "teacher", "flow_matching", 8, batch_size=16)))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["generate-set", "--ckpt", str(root / "teacher"), "--out", str(root / "pairs"), "--kind", "pairs",
                 "--prompts", str(root / "prompts.txt"), "--n", "6", "--shard-size", "4", "--steps", "2",
                 "--sampler", "euler", "--cfg-scale", "1", "--device", "cpu"]) == 0
    return root


def test_text_pairs_hold_the_prompts_and_the_teachers_solve(teacher_and_pairs):
    root = teacher_and_pairs
    manifest = json.loads((root / "pairs" / "set.json").read_text())
    assert manifest["prompts"] == PROMPTS and manifest["text"]["hashed_dim"] == 32 and manifest["num_classes"] == 0
    pairs = load_pairs(root / "pairs")
    assert pairs.texts == PROMPTS and pairs.labels.tolist() == [0, 1, 2, 0, 1, 2] and pairs.num_classes == 0
    # sample k is the teacher's 2-step Euler solve from seed k's noise, conditioned on prompt k mod 3's own embedding
    teacher, _, text = load_text_generator(root / "teacher")
    embedding = make_encoder(text).encode([PROMPTS[k % 3] for k in range(6)])
    noise = noise_for_seeds(list(range(6)), (1, 8, 8))
    with torch.no_grad():
        expected = euler_steps(teacher.eval(), noise, embedding, 2).clamp(-1, 1)
    assert torch.equal(pairs.noise, noise) and torch.allclose(pairs.samples, expected, atol=1e-5)


def _trainer(config):
    from selfflow.trainer import Trainer

    return Trainer(config)


def _one_batch(trainer):
    x0, y = trainer.dataset.get_batch(torch.arange(6))
    noise = trainer.dataset.get_noise(torch.arange(6))
    return Batch(x0=x0, y=y, noise=noise, random=BatchRandom(torch.Generator().manual_seed(0), 6, slice(0, 6))), noise


def test_reflow_and_distill_losses_on_text_pairs_are_the_hand_computed_ones(teacher_and_pairs):
    root = teacher_and_pairs
    teacher, _, text = load_text_generator(root / "teacher")
    embedding = make_encoder(text).encode([PROMPTS[k % 3] for k in range(6)])
    data = {"name": "pairs", "path": str(root / "pairs")}
    reflow = _trainer(config_from_dict(text_raw(root, root / "reflow", "reflow", 1, data, init_from=str(root / "teacher"))))
    try:
        student = reflow.model
        assert isinstance(student, DiT) and student.conditions_on_text and student.num_classes == 3
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
        batch, eps = _one_batch(reflow)
        loss, _ = reflow.method.loss(student, batch)
        t = torch.rand(6, generator=torch.Generator().manual_seed(0))  # uniform training times, one draw
        x0 = reflow.dataset.samples[:6]
        x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps
        hand = (student(x_t, t, embedding) - (eps - x0)).pow(2).mean()
        assert torch.allclose(loss, hand, atol=1e-6, rtol=1e-5)
    finally:
        reflow.close()
    distill = _trainer(config_from_dict(text_raw(root, root / "distill", "distill", 1, data, init_from=str(root / "teacher"))))
    try:
        batch, eps = _one_batch(distill)
        loss, logs = distill.method.loss(distill.model, batch)
        one_step = eps - distill.model(eps, torch.ones(6), embedding)  # G(ε, c) = ε − v(ε, 1, c)
        hand = (one_step - distill.dataset.samples[:6]).pow(2).mean()
        assert torch.allclose(loss, hand, atol=1e-6, rtol=1e-5) and torch.allclose(logs["mse"], hand, atol=1e-6, rtol=1e-5)
    finally:
        distill.close()


def test_the_one_step_student_samples_from_prompts(teacher_and_pairs, capsys):
    import numpy as np

    root = teacher_and_pairs
    data = {"name": "pairs", "path": str(root / "pairs")}
    train_config(config_from_dict(text_raw(root, root / "student", "distill", 3, data, init_from=str(root / "teacher"))))
    out = root / "student_samples"
    assert main(["sample", "--ckpt", str(root / "student"), "--out", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--n", "2", "--steps", "1", "--cfg-scale", "1", "--device", "cpu"]) == 0
    info = json.loads((out / "samples.json").read_text())
    assert info["nfe_per_sample"] == 1 and info["prompts"] == PROMPTS[:2]
    assert np.load(out / "samples.npz")["images"].shape == (2, 1, 8, 8)
    # one noise, two prompts: the single step's image depends on the prompt
    student, _, text = load_text_generator(root / "student")
    eps = noise_for_seeds([0, 0], (1, 8, 8))
    with torch.no_grad():
        images = euler_steps(student.eval(), eps, make_encoder(text).encode(PROMPTS[:2]), 1)
    assert (images[0] - images[1]).abs().max() > 1e-3


def test_dmd_on_text_pairs_gives_the_teacher_the_students_captions(teacher_and_pairs):
    root = teacher_and_pairs
    data = {"name": "pairs", "path": str(root / "pairs")}
    method = {"name": "dmd", "teacher": str(root / "teacher"), "regression_weight": 0.25}
    trainer, result = train_config(config_from_dict(text_raw(root, root / "dmd", method, 2, data, init_from=str(root / "teacher"))))
    assert result["step"] == 2
    for scorer in (trainer.method.teacher, trainer.method.fake):
        assert isinstance(scorer, DiT) and scorer.conditions_on_text and torch.equal(scorer.bank.pooled.cpu(), trainer.model.bank.pooled.cpu())


def _write(path, raw) -> str:
    path.write_text(json.dumps(raw))  # JSON is YAML
    return str(path)


def test_label_and_caption_parts_do_not_mix(teacher_and_pairs, tmp_path, capsys):
    root = teacher_and_pairs
    torch.manual_seed(0)
    label_model = DiT(ModelConfig(size="tiny", depth=2, hidden_size=64, num_heads=4, image_size=8, in_channels=1, num_classes=10))
    label_model.save_pretrained(tmp_path / "label_teacher")
    generate_set(label_model, tmp_path / "label_pairs", num=6, kind="pairs", steps=1)
    text_pairs = {"name": "pairs", "path": str(root / "pairs")}
    label_pairs = {"name": "pairs", "path": str(tmp_path / "label_pairs")}
    teacher = str(root / "teacher")
    cases = [
        (text_raw(tmp_path, tmp_path / "a", "reflow", 1, label_pairs, init_from=teacher), ("class-label pair set", "--prompts")),
        ({**text_raw(tmp_path, tmp_path / "b", "reflow", 1, text_pairs, init_from=teacher), "text": None},
         ("pairs made from caption prompts", "no text section")),
        (text_raw(tmp_path, tmp_path / "c", "reflow", 1, text_pairs, hashed_dim=16, init_from=teacher), ("text.hashed_dim=16 (32 there)",)),
        (text_raw(tmp_path, tmp_path / "d", "reflow", 1, text_pairs, init_from=str(tmp_path / "label_teacher")),
         ("class-label teacher", "has a text section")),
    ]
    for k, (raw, needles) in enumerate(cases):
        if raw.get("text") is None:
            raw.pop("text")
        capsys.readouterr()
        assert main(["train", "--config", _write(tmp_path / f"{k}.yaml", raw)]) == 2
        one_line_error(capsys, *needles)
        assert not (tmp_path / "abcd"[k]).exists()  # nothing written
    assert main(["generate-set", "--ckpt", str(tmp_path / "label_teacher"), "--out", str(tmp_path / "s"), "--n", "2",
                 "--prompt", "a seven"]) == 2
    one_line_error(capsys, "--prompt", "class-label model", "--labels")
    assert not (tmp_path / "s").exists()


# ---- the shipped configs ------------------------------------------------------------------------------
CONFIGS = REPO / "configs"


@pytest.mark.parametrize("name, method", [("digits_text_distill", "distill"), ("digits_text_reflow", "reflow")])
def test_the_shipped_text_student_configs_fit_the_text_teacher_and_train(teacher_and_pairs, name, method):
    from selfflow.config import load_config
    from selfflow.text.data import encoding_difference

    shipped, teacher = load_config(CONFIGS / f"{name}.yaml"), load_config(CONFIGS / "digits_text_self_flow.yaml")
    assert shipped.method_name() == method and shipped.data.name == "pairs" and shipped.sample.steps == 1
    assert encoding_difference(shipped.text, teacher.text) is None and shipped.model == teacher.model
    assert shipped.train.init_from == teacher.train.out_dir
    root = teacher_and_pairs  # the same file, pointed at the tiny teacher and its pairs
    trainer, result = train_config(load_config(CONFIGS / f"{name}.yaml", [
        "text.encoder=hashed", "text.hashed_dim=32", f"text.cache_dir={root / 'cache'}", f"data.path={root / 'pairs'}",
        f"train.init_from={root / 'teacher'}", "model.depth=2", "train.steps=1", "train.batch_size=6", "train.progress=false",
        "train.tensorboard=false", "train.num_sample_images=0", f"train.out_dir={root / name}"]))
    assert result["step"] == 1 and trainer.model.conditions_on_text and trainer.model.num_classes == len(PROMPTS)


def test_the_shipped_prompt_file_names_every_digit_thickness_and_slant_in_training_templates():
    from selfflow.text.captions import is_heldout, parse_prompt
    from selfflow.text.generate import read_prompts

    prompts = read_prompts(CONFIGS / "digits_text_prompts.txt")
    specs = {tuple(vars(parse_prompt(p)).values()) for p in prompts}
    assert len(prompts) == len(specs) == 90 and all(None not in spec for spec in specs)
    assert not any(is_heldout(p) for p in prompts)  # the evaluation prompts stay unseen
