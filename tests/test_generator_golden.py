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

from selfflow.config import ModelConfig
from selfflow.model import DiT, TimeRows
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
