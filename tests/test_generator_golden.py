"""One generator class gives the numbers the three old ones gave (image ``DiT``, caption ``TextDiT``,
token ``TokenDiT``), on the same weights, and keeps their parameter names and order (so their
checkpoints and optimizer states load unchanged).

``tests/data/generator_golden.*`` were written by this file's ``__main__`` on commit 0260c0a, before
the three classes became configurations of one: for each configuration the parameter names in
``parameters()`` order, the state-dict keys, and the outputs on fixed inputs with weights drawn from
each parameter's name (:func:`fill`). Regenerate only to add a configuration:
``PYTHONPATH=. python tests/test_generator_golden.py``.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfflow.config import ModalityConfig, ModelConfig, TextConfig
from selfflow.loader import load_model
from selfflow.model import Condition, DiT, TimeRows, build_generator
from selfflow.modalities.model import TokenDiT
from selfflow.modalities.tokens import Layout, Part
from selfflow.text.encoders import TextEmbedding
from selfflow.text.model import TextDiT

DATA = Path(__file__).resolve().parent / "data"
NAMES, OUTPUTS = DATA / "generator_golden.json", DATA / "generator_golden.safetensors"
BATCH, TEXT_DIM = 3, 12


def tiny(**kw) -> ModelConfig:
    return ModelConfig(size="tiny", depth=2, hidden_size=32, num_heads=2, **kw)


VIDEO = Part("video", (1, 4, 8, 8), (2, 4, 4), time_axis=0)
AUDIO = Part("audio", (1, 8, 8), (4, 2), time_axis=1)
ACTIONS = Part("actions", (4, 8), (2,))

# name: (builder, condition): "label" y (B,) int64 with the null label, "caption" a TextEmbedding and bank
# indices, "vector" (B, dim) float observations
CONFIGS = {
    "image_labels": (lambda: DiT(tiny(image_size=8, in_channels=3, num_classes=4)), ("label", 4)),
    "image_unconditional": (lambda: DiT(tiny(image_size=8, in_channels=1, num_classes=0, patch_size=4)), ("label", 0)),
    "image_stored_positions": (lambda: DiT(tiny(image_size=8, in_channels=1, num_classes=3, pos_embed="stored",
                                               time_scale=1.0, time_shift=0.5)), ("label", 3)),
    "text_image": (lambda: TextDiT(tiny(image_size=8, in_channels=1), TEXT_DIM), ("caption", 2)),
    "token_video_labels": (lambda: TokenDiT(tiny(num_classes=5), Layout((VIDEO,))), ("label", 5)),
    "token_audio_video": (lambda: TokenDiT(tiny(num_classes=2), Layout((VIDEO, AUDIO))), ("label", 2)),
    "token_actions_vector": (lambda: TokenDiT(tiny(num_classes=10), Layout((ACTIONS,)), cond_dim=6), ("vector", 6)),
    "token_actions_image_observation": (lambda: TokenDiT(tiny(num_classes=10), Layout((ACTIONS,)), cond_dim=2 * (3 * 8 * 8 + 3),
                                                         cond_image=(2, 8, 3)), ("vector", 2 * (3 * 8 * 8 + 3))),
}


def fill(model: torch.nn.Module) -> None:
    """Every parameter from a generator seeded by its name: the same weights whatever the build order."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def inputs(model, condition) -> dict:
    """Fixed inputs: samples, per-sample times, two time rows per sample, and the condition in each form."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, *model.sample_shape, generator=g)
    t = torch.rand(BATCH, generator=g)
    rows = TimeRows(torch.rand(BATCH, 2, generator=g), torch.randint(0, 2, (BATCH, model.num_tokens), generator=g))
    kind, size = condition
    if kind == "label":
        return dict(x=x, t=t, rows=rows, y=[torch.tensor([0, size, max(size - 1, 0)]), None])
    if kind == "vector":
        return dict(x=x, t=t, rows=rows, y=[torch.rand(BATCH, size, generator=g) * 2 - 1, None])
    tokens = torch.randn(BATCH, 4, TEXT_DIM, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    embedding = TextEmbedding(torch.randn(BATCH, TEXT_DIM, generator=g), tokens * mask[..., None], mask)
    model.set_bank(TextEmbedding(embedding.pooled[:2], embedding.tokens[:2], embedding.mask[:2]))
    return dict(x=x, t=t, rows=rows, y=[embedding, torch.tensor([1, 2, 0]), None])  # bank index 2: the null caption


def outputs(model, condition) -> dict[str, torch.Tensor]:
    given = inputs(model, condition)
    out = {}
    with torch.no_grad():
        for k, y in enumerate(given["y"]):
            out[f"sample_time_y{k}"] = model(given["x"], given["t"], y)
            v, hiddens = model(given["x"], given["rows"], y, return_layers=(1,))
            out[f"time_rows_y{k}"] = v
            if k == 0:
                out["hidden1"] = hiddens[1]
                out["stop_after1"] = model(given["x"], given["rows"], y, stop_after=1)[1][1]
            out[f"token_times_y{k}"] = model(given["x"], given["rows"].per_token(), y)
    return out


def build(name: str):
    torch.manual_seed(0)
    builder, condition = CONFIGS[name]
    model = builder().eval()
    fill(model)
    return model, condition


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_generator_keeps_the_old_classes_names_order_and_numbers(name):
    golden = json.loads(NAMES.read_text())[name]
    model, condition = build(name)
    assert [n for n, _ in model.named_parameters()] == golden["parameters"]  # optimizer states index by this order
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == golden["state"]
    expected = load_file(OUTPUTS)
    got = outputs(model, condition)
    assert sorted(got) == sorted(k.split("/", 1)[1] for k in expected if k.startswith(name + "/"))
    for key, value in got.items():
        torch.testing.assert_close(value, expected[f"{name}/{key}"], rtol=0, atol=1e-6, msg=f"{name}: {key}")



# ---- one class, configured -------------------------------------------------------------------------
def test_the_old_names_build_the_one_class_and_it_is_the_only_generator_class():
    import re

    assert all(type(build(name)[0]) is DiT for name in CONFIGS)  # TextDiT, TokenDiT: factories, no class of their own
    package = Path(__file__).resolve().parents[1] / "selfflow"
    classes = [f"{p.relative_to(package)}: {line}" for p in package.rglob("*.py")
               for line in p.read_text().splitlines() if re.match(r"class \w*DiT\b", line)]
    assert classes == ["model.py: class DiT(nn.Module):"]


def test_a_condition_names_what_is_wrong():
    with pytest.raises(ValueError, match="condition kind 'audio'"):
        Condition("audio")
    with pytest.raises(ValueError, match="caption condition needs its width"):
        Condition("caption")
    with pytest.raises(ValueError, match="set_bank: this model is not caption-conditioned"):
        build("image_labels")[0].set_bank(TextEmbedding(torch.zeros(1, 4), torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)))


def caption_video(tmp_path):
    """A text-to-video model from a run's sections (a caption condition on a video layout), saved and loaded back."""
    text = TextConfig(encoder="hashed", hashed_dim=TEXT_DIM, cache_dir=str(tmp_path / "cache"))
    modality = ModalityConfig(kind="video", frames=4, frame_size=8, video_patch_frames=2, video_patch=4)
    torch.manual_seed(0)
    model = build_generator(tiny(num_classes=0), text=text, modality=modality)
    return model, text, modality


def test_a_caption_conditioned_video_model_trains_and_reloads(tmp_path):
    model, text, modality = caption_video(tmp_path)
    assert model.conditions_on_text and model.sample_shape == (1, 4, 8, 8) and model.text_dim == TEXT_DIM
    g = torch.Generator().manual_seed(0)
    captions = TextEmbedding(torch.randn(4, TEXT_DIM, generator=g), torch.randn(4, 3, TEXT_DIM, generator=g),
                             torch.tensor([[True, True, False]] * 4))
    model.set_bank(captions)
    x0 = torch.randn(4, *model.sample_shape, generator=g)
    y = torch.tensor([0, 1, 2, 4])  # bank index 4: the null caption
    # a fresh model is the plain model: the cross-attention's output starts at zero, so no caption is read
    t = torch.rand(4, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x0, t, y), model(x0, t, None))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):  # flow matching with two time rows per sample (Self-Flow's per-token times)
        noise = torch.randn(x0.shape, generator=g)
        rows = TimeRows(torch.rand(4, 2, generator=g), torch.randint(0, 2, (4, model.num_tokens), generator=g))
        t_tokens = model.expand_token_values(rows.per_token())
        loss = (model((1 - t_tokens) * x0 + t_tokens * noise, rows, y) - (noise - x0)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.blocks[0].cross.proj.weight.grad.abs().sum() > 0  # past adaLN-Zero's start the caption reaches the loss
    model.eval()
    with torch.no_grad():
        v = model(x0, t, y)
        assert not torch.allclose(v, model(x0, t, None))  # trained: the caption now changes the velocity
        torch.testing.assert_close(v[3], model(x0[3:], t[3:], None)[0], rtol=0, atol=1e-6)  # index K: the null caption
    folder = model.save_pretrained(tmp_path / "t2v", text=text, modality=modality)
    loaded = load_model(folder)
    assert type(loaded.model) is DiT and loaded.text == text and loaded.modality == modality
    loaded.model.set_bank(captions)
    with torch.no_grad():
        assert torch.equal(loaded.model(x0, t, y), v)


if __name__ == "__main__":
    names, tensors = {}, {}
    for name in CONFIGS:
        model, condition = build(name)
        names[name] = {"parameters": [n for n, _ in model.named_parameters()],
                       "state": {k: list(v.shape) for k, v in model.state_dict().items()}}
        tensors.update({f"{name}/{k}": v.contiguous() for k, v in outputs(model, condition).items()})
    DATA.mkdir(exist_ok=True)
    NAMES.write_text(json.dumps(names, indent=1) + "\n")
    save_file(tensors, OUTPUTS)
    print(f"wrote {NAMES} and {OUTPUTS} ({sum(v.numel() for v in tensors.values())} values)")
