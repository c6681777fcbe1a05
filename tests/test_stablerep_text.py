"""StableRep on text captions: ``selfflow synth --captions FILE`` from a caption-conditioned generator,
and StableRep+'s image–caption contrastive term (method.caption_weight)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from selfflow.cli import main
from selfflow.config import ModelConfig, TextConfig, config_from_dict
from selfflow.data.synth import load_synth
from selfflow.imageio import to_uint8
from selfflow.methods import Batch, BatchRandom, build_method, build_network
from selfflow.methods.one_step import euler_steps
from selfflow.represent.losses import image_text_loss, stablerep_loss
from selfflow.sampling import noise_for_seeds
from selfflow.text.data import make_encoder
from selfflow.text.model import TextDiT
from support import fit, one_line_error, perturbed_dit, tiny_run

LINES = ["a thin seven", "the digit 3, bold strokes", "number 1, slanted left"]


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    """A nudged tiny TextDiT exported with its text section, and a synth set of 3 captions × 2 images × 2 rounds from it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stablerep_text")
    text = TextConfig(encoder="hashed", hashed_dim=32, cache_dir=str(root / "cache"))
    torch.manual_seed(0)
    model = TextDiT(ModelConfig(size="tiny", depth=2, hidden_size=64, num_heads=4, image_size=8, in_channels=1), 32)
    with torch.no_grad():  # off the zero start, so the caption matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "gen", text)
    (root / "captions.txt").write_text("\n".join(LINES) + "\n\n")
    assert main(["synth", "--ckpt", str(root / "gen"), "--captions", str(root / "captions.txt"), "--per-caption", "2",
                 "--n", "12", "--shard-size", "5", "--sampler", "euler", "--steps", "2", "--cfg-scale", "1",
                 "--out", str(root / "set"), "--device", "cpu"]) == 0
    return root, model, text


def test_synth_from_a_text_generator_groups_images_by_caption_line(text_set):
    root, model, text = text_set
    manifest = json.loads((root / "set" / "set.json").read_text())
    assert manifest["captions"] == {"kind": "text", "per_caption": 2, "table": LINES, "identity": "group"}
    assert manifest["text"]["encoder"] == "hashed" and manifest["text"]["hashed_dim"] == 32
    data = load_synth(root / "set")
    assert data.captions.tolist() == [0, 0, 1, 1, 2, 2] * 2 and data.labels.tolist() == [-1] * 12 and len(data) == 6
    # image k: the generator's 2-step Euler solve from seed k's noise, conditioned on its caption line's own embedding
    embedding = make_encoder(text).encode([LINES[c] for c in data.captions.tolist()])
    with torch.no_grad():
        expected = to_uint8(euler_steps(model.eval(), noise_for_seeds(list(range(12)), (1, 8, 8)), embedding, 2).clamp(-1, 1))
    assert (data.images.int() - expected.int()).abs().max() <= 1
    # the identity is the row (group), not the line: rows 0 and 3 share "a thin seven" and are negatives of each other
    _, ids = data.get_batch(torch.arange(6))
    assert ids.tolist() == [[g, g] for g in range(6)]
    assert data.group_captions.tolist() == [0, 1, 2, 0, 1, 2]


def test_text_caption_rows_give_m_minus_1_positives_from_a_real_batch(text_set):
    root = text_set[0]
    data = load_synth(root / "set")
    encoder, method = _method(root, 0.0)
    x0, ids = data.get_batch(torch.arange(6))  # every line twice in the batch
    _, logs = method.loss(encoder, Batch(x0=x0, y=ids, random=BatchRandom(torch.Generator().manual_seed(0), 6, slice(0, 6))))
    assert float(logs["positives"]) == 1.0  # m − 1 with m = 2; by caption line it would be 3


def test_image_text_loss_is_the_hand_computed_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g)
    index = torch.tensor([0, 1, 1, 0])
    tau = 0.5
    u = [v / v.norm() for v in images]
    w = [v / v.norm() for v in texts]
    s = [[float(u[i] @ w[c]) / tau for c in range(2)] for i in range(4)]
    i2t = sum(-s[i][index[i]] + math.log(sum(math.exp(x) for x in s[i])) for i in range(4)) / 4
    t2i = 0.0
    for c in range(2):
        mine = [i for i in range(4) if index[i] == c]
        log_z = math.log(sum(math.exp(s[i][c]) for i in range(4)))
        t2i += sum(-(s[i][c] - log_z) / len(mine) for i in mine) / 2
    assert image_text_loss(images, texts, index, 1 / tau).item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)
    # one image per caption: CLIP's symmetric cross-entropy
    logits = torch.nn.functional.normalize(images[:2], dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T / tau
    clip = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(2)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(2)))
    assert torch.allclose(image_text_loss(images[:2], texts, torch.arange(2), 1 / tau), clip, atol=1e-6)


def _method(root, weight: float):
    raw = tiny_run(root / "unused", method={"name": "stablerep", "encoder": "vit", "head_hidden": 32, "embed_dim": 16,
                                             "caption_weight": weight},
                   data={"name": "synth", "path": str(root / "set")}, train={"batch_size": 3})
    config = config_from_dict(raw)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, image_size=8, in_channels=1, num_classes=0))
    torch.manual_seed(0)
    encoder = build_network(config)
    method = build_method(config.method, encoder)
    method.bind_data(load_synth(root / "set"))
    return encoder, method


def test_stablerep_plus_adds_the_weighted_caption_term_and_weight_zero_is_plain_stablerep(text_set):
    root = text_set[0]
    data = load_synth(root / "set")
    x0, ids = data.get_batch(torch.arange(6))

    def batch():
        return Batch(x0=x0, y=ids, random=BatchRandom(torch.Generator().manual_seed(3), 6, slice(0, 6)))

    plain_encoder, plain = _method(root, 0.0)
    assert plain.text_proj is None and not any("text" in k for k in plain.state_dict())
    loss0, logs0 = plain.loss(plain_encoder, batch())
    views = plain.views(x0, batch(), 1)[0]
    z = plain.head(plain_encoder(views.flatten(0, 1)))
    assert torch.equal(loss0, stablerep_loss(z, ids.flatten(), 0.1)[0]) and "loss_caption" not in logs0

    encoder, plus = _method(root, 1.0)
    assert plus.logit_scale().item() == pytest.approx(1 / 0.07)  # the paper's start
    with torch.no_grad():
        plus.logit_offset.fill_(0.3)
    loss, logs = plus.loss(encoder, batch())
    features = encoder(plus.views(x0, batch(), 1)[0].flatten(0, 1))
    z = plus.head(features)
    u = plus.image_proj(features)  # the image side: its own linear projection of the features, not the head
    table = make_encoder(TextConfig(encoder="hashed", hashed_dim=32, cache_dir=str(root / "cache"))).encode(LINES).pooled
    texts = plus.text_proj(table[[0, 1, 2, 0, 1, 2]])  # one text per row (rows 0..5 use lines 0, 1, 2, 0, 1, 2)
    scale = math.exp(math.log(1 / 0.07) + 0.3)
    # by hand: s_ic = scale · cos(u_i, w_c); image → text CE over the 6 rows; text → image: row c's own 2 images
    s = scale * torch.nn.functional.normalize(u, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    row = ids.flatten()
    i2t = -(s[torch.arange(12), row] - s.logsumexp(1)).mean()
    t2i = torch.stack([-(s[row == c, c] - s[:, c].logsumexp(0)).mean() for c in range(6)]).mean()
    hand_caption = 0.5 * (i2t + t2i)
    assert torch.allclose(logs["loss_caption"], hand_caption, atol=1e-5)
    assert logs["logit_scale"].item() == pytest.approx(scale)
    assert torch.allclose(loss, stablerep_loss(z, row, 0.1)[0] + 1.0 * hand_caption, atol=1e-5)
    assert torch.equal(loss0, stablerep_loss(z, row, 0.1)[0])  # the same encoder weights (seed 0): the plain term
    loss.backward()
    assert plus.logit_offset.grad is not None and plus.logit_offset.grad != 0  # the scale is learned
    with torch.no_grad():
        plus.logit_offset.fill_(5.0)  # log(1/0.07) + 5 > log 100: capped
    assert plus.logit_scale().item() == pytest.approx(100.0)


def test_stablerep_plus_trains_and_needs_caption_texts(text_set, tmp_path, capsys):
    root = text_set[0]
    method = {"name": "stablerep", "encoder": "vit", "head_hidden": 32, "embed_dim": 16, "caption_weight": 1.0}
    trainer = fit(tiny_run(tmp_path / "run", method=method, data={"name": "synth", "path": str(root / "set")},
                           train={"steps": 2, "batch_size": 3}))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert trainer.method.text_proj is not None and all("loss_caption" in row for row in logged)
    from selfflow.represent.synth import make_synth_set

    make_synth_set(perturbed_dit(), tmp_path / "classes", captions="classes", per_caption=2, num=16, sampler="euler", steps=2)
    raw = tiny_run(tmp_path / "bad", method=method, data={"name": "synth", "path": str(tmp_path / "classes")},
                   train={"steps": 1, "batch_size": 8})
    (tmp_path / "bad.yaml").write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["represent", "train", "--config", str(tmp_path / "bad.yaml")]) == 2
    one_line_error(capsys, "method.caption_weight=1", "synth --captions FILE")
    assert not (tmp_path / "bad").exists()
