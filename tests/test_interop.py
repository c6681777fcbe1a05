"""Importing SiT, REPA and official Self-Flow checkpoints (selfflow.interop).

The source networks are written here from the published description of their layout (parameter
names, shapes, time conventions; docs/methods.md#imported-checkpoints), not copied: a minimal
SiT-like module, with plain (non-fused) attention so that it is an independent computation.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
from torch import nn

from selfflow.cli import main
from selfflow.errors import CheckpointError
from selfflow.interop import convert_state, export_state, import_checkpoint, load_torch_file, read_checkpoint_file, unwrap_state
from selfflow.model import DiT
from support import one_line_error

torch.set_num_threads(1)
HIDDEN, DEPTH, HEADS, PATCH, CHANNELS, SIZE, CLASSES = 64, 2, 4, 2, 4, 8, 10


# ---- a source network in SiT's layout ------------------------------------------------------------
def reference_sincos(dim: int, grid: int) -> torch.Tensor:
    """MAE/SiT positions, written from their description: half the width encodes the column
    (sin then cos of x·ω), half the row; ω_k = 10000^(−k/(dim/4)); row-major tokens. float64 → float32."""
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid), torch.arange(grid, dtype=torch.float64).repeat(grid)
    parts = [torch.sin(cols[:, None] * omega), torch.cos(cols[:, None] * omega), torch.sin(rows[:, None] * omega), torch.cos(rows[:, None] * omega)]
    return torch.cat(parts, dim=1).float()


class SourceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.attn.proj = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.mlp.fc2 = nn.Linear(4 * HIDDEN, HIDDEN)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, 6 * HIDDEN))

    def forward(self, h, c):  # c: (B, 1, D) per sample or (B, N, D) per token
        norm = lambda z: nn.functional.layer_norm(z, (HIDDEN,), eps=1e-6)  # noqa: E731
        a, b, g, a2, b2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        z = norm(h) * (1 + b) + a
        B, N, _ = z.shape
        q, k, v = self.attn.qkv(z).reshape(B, N, 3, HEADS, HIDDEN // HEADS).unbind(2)
        weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(HIDDEN // HEADS), dim=-1)
        h = h + g * self.attn.proj(torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(B, N, HIDDEN))
        z = norm(h) * (1 + b2) + a2
        return h + g2 * self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(z), approximate="tanh"))


class SourceSiT(nn.Module):
    """SiT's parameter names; ``linear_patch``: the release's Linear over (c p1 p2) tokens;
    ``learn_sigma``: 2C output channels; ``projectors``: REPA's projection MLPs (unused here)."""

    def __init__(self, learn_sigma=True, linear_patch=False, projectors=False, null_row=True, pos=None):
        super().__init__()
        self.learn_sigma, self.linear_patch = learn_sigma, linear_patch
        self.x_embedder = nn.Module()
        self.x_embedder.proj = (nn.Linear(CHANNELS * PATCH * PATCH, HIDDEN) if linear_patch
                                else nn.Conv2d(CHANNELS, HIDDEN, PATCH, stride=PATCH))
        grid = SIZE // PATCH
        table = reference_sincos(HIDDEN, grid) if pos is None else pos
        self.pos_embed = nn.Parameter(table[None].clone(), requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + int(null_row), HIDDEN)
        self.blocks = nn.ModuleList([SourceBlock() for _ in range(DEPTH)])
        if projectors:
            self.projectors = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 16))])
        out = CHANNELS * (2 if learn_sigma else 1)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(HIDDEN, PATCH * PATCH * out)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, 2 * HIDDEN))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name != "pos_embed":
                    p.copy_(0.2 * torch.randn_like(p))

    def time_features(self, s):  # s unscaled; cos then sin of s·ω_k, ω_k = 10000^(−k/128)
        omega = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
        args = s.float()[..., None] * omega
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def raw(self, x, s, y):
        """The raw network at source time s: (B,) or per token (B, N)."""
        B = x.shape[0]
        g = SIZE // PATCH
        if self.linear_patch:  # tokens (B, N, C·p·p) in (c p1 p2) order, row-major
            tokens = x.reshape(B, CHANNELS, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
            h = self.x_embedder.proj(tokens)
        else:
            h = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        h = h + self.pos_embed
        c = self.t_embedder.mlp(self.time_features(s))
        c = (c[:, None] if s.dim() == 1 else c) + self.y_embedder.embedding_table(y)[:, None]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=-1)
        out = self.final_layer.linear(nn.functional.layer_norm(h, (HIDDEN,), eps=1e-6) * (1 + scale) + shift)
        cout = out.shape[-1] // (PATCH * PATCH)  # token rows (p q c) → image
        img = out.reshape(B, g, g, PATCH, PATCH, cout).permute(0, 5, 1, 3, 2, 4).reshape(B, cout, SIZE, SIZE)
        return img[:, :CHANNELS]

    # the source's own velocity, converted to ours (docs/methods.md#imported-checkpoints)
    def sit_velocity(self, x, t, y):  # SiT: v_ours(x, t) = −u_SiT(x, 1 − t)
        return -self.raw(x, 1 - t, y)

    def release_forward(self, x, t, y):  # the release's forward takes our t and returns −raw(x, 1 − t)
        return -self.raw(x, 1.0 - t, y)

    def repa_velocity(self, x, t, y):  # REPA: our convention, t embedded as given
        return self.raw(x, t, y)


def inputs(batch=5, per_token=False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.rand(batch, generator=g)
    if per_token:
        t = torch.rand(batch, (SIZE // PATCH) ** 2, generator=g)
    y = torch.randint(0, CLASSES + 1, (batch,), generator=g)
    y[0] = CLASSES  # the null label
    return x, t, y


def assert_same_velocity(ours: DiT, reference, per_token=False):
    x, t, y = inputs(per_token=per_token)
    with torch.no_grad():
        expected, got = reference(x, t, y), ours(x, t, y)
    scale = expected.abs().max().item()
    assert scale > 0.1  # a live network, not a zero output
    assert torch.allclose(got, expected, atol=1e-4 * scale, rtol=0)  # float32 rounding; a wrong map is off by O(scale), (got - expected).abs().max()


def save_namespace_training_dict(path, ema, model_state, **extra):
    args = argparse.Namespace(model="tiny", image_size=SIZE, num_classes=CLASSES, learn_sigma=True)
    torch.save({"model": model_state, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args, **extra}, path)


# ---- the safe loader -------------------------------------------------------------------------------
def test_a_pickle_with_a_namespace_loads_as_plain_data(tmp_path):
    source = SourceSiT()
    path = tmp_path / "train.pt"
    save_namespace_training_dict(path, source.state_dict(), source.state_dict(), steps=7)
    loaded = load_torch_file(path)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].num_classes == CLASSES
    assert loaded["steps"] == 7 and loaded["opt"]["param_groups"][0]["lr"] == 1e-4
    for key, value in source.state_dict().items():
        assert torch.equal(loaded["ema"][key], value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_views_and_dtypes_survive_the_safe_loader(tmp_path, dtype):
    base = (torch.arange(24) % 5).to(dtype).reshape(4, 6)
    saved = {"t": base.t(), "slice": base[1:, 2:], "same": base}  # strided views sharing one storage
    torch.save(saved, tmp_path / "v.pt")
    loaded = load_torch_file(tmp_path / "v.pt")
    for key, value in saved.items():
        assert loaded[key].dtype == dtype and torch.equal(loaded[key], value)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("kind, refused", [(Payload, "system"), (WritesAFile, r"\.exec")])
def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path, kind, refused):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": kind(marker)}, path)
    with pytest.raises(CheckpointError, match=refused) as info:
        load_torch_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    assert main(["import", "--ckpt", str(path), "--from", "sit", "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_not_a_torch_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip at all")
    assert main(["import", "--ckpt", str(bad), "--from", "sit", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "bad.pt", "not a torch zip archive")
    assert main(["import", "--ckpt", str(tmp_path / "missing.pt"), "--from", "repa", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "missing.pt", "no such file")


# ---- each source format → the same velocity --------------------------------------------------------
def imported(tmp_path, file, source, **options) -> DiT:
    import_checkpoint(file, source, tmp_path / "model", **options)
    return DiT.from_pretrained(tmp_path / "model").eval()


def test_sit_bare_ema_state_dict(tmp_path):
    source = SourceSiT(learn_sigma=True)
    torch.save(source.state_dict(), tmp_path / "SiT-tiny.pt")
    model = imported(tmp_path, tmp_path / "SiT-tiny.pt", "sit", num_heads=HEADS)
    assert model.config.pos_embed == "sincos" and (model.config.time_shift, model.config.time_scale) == (1.0, -1.0)
    assert_same_velocity(model, source.sit_velocity)


def test_sit_training_dict_with_namespace_picks_ema_or_model(tmp_path):
    ema, raw = SourceSiT(), SourceSiT()
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.1)
    save_namespace_training_dict(tmp_path / "0400000.pt", ema.state_dict(), raw.state_dict())
    assert_same_velocity(imported(tmp_path / "e", tmp_path / "0400000.pt", "sit", num_heads=HEADS), ema.sit_velocity)
    assert_same_velocity(imported(tmp_path / "m", tmp_path / "0400000.pt", "sit", num_heads=HEADS, weights="model"), raw.sit_velocity)
    meta = json.loads((tmp_path / "e" / "model" / "config.json").read_text())
    assert meta["import"]["source"] == "sit" and meta["run"]["sample"]["sampler"] == "sit_sde"


def test_repa_with_projectors_and_legacy_decoder_blocks(tmp_path):
    source = SourceSiT(learn_sigma=False, projectors=True)
    state = source.state_dict()
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - 1}.{k.split('.', 2)[2]}" if k.startswith("blocks.1.") else k): v
              for k, v in state.items()}  # encoder depth 1: block 1 is decoder block 0
    assert any(k.startswith("decoder_blocks.0.") for k in legacy)
    torch.save({"model": state, "ema": legacy, "opt": {}, "args": argparse.Namespace(enc_type="dinov2-vit-b"), "steps": 4000},
               tmp_path / "repa.pt")
    model = imported(tmp_path, tmp_path / "repa.pt", "repa", num_heads=HEADS)
    assert (model.config.time_shift, model.config.time_scale) == (0.0, 1.0)
    assert_same_velocity(model, source.repa_velocity)
    notes = json.loads((tmp_path / "model" / "config.json").read_text())["import"]["notes"]
    assert any("projectors" in n for n in notes) and any("decoder_blocks" in n for n in notes)


@pytest.mark.parametrize("per_token", [False, True])
def test_release_wrapped_module_prefixed_linear_patch(tmp_path, per_token):
    source = SourceSiT(learn_sigma=True, linear_patch=True)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.feature_head.0.weight"] = torch.randn(3, HIDDEN)  # a projection head: not the generator's
    torch.save({"model": state}, tmp_path / "selfflow_imagenet256.pt")
    model = imported(tmp_path, tmp_path / "selfflow_imagenet256.pt", "selfflow-official", num_heads=HEADS)
    assert_same_velocity(model, source.release_forward, per_token=per_token)


def test_safetensors_and_a_stored_position_table(tmp_path):
    from safetensors.torch import save_file

    source = SourceSiT(learn_sigma=False, pos=0.5 * torch.randn((SIZE // PATCH) ** 2, HIDDEN))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "sit.safetensors"))
    model = imported(tmp_path, tmp_path / "sit.safetensors", "sit", num_heads=HEADS)
    assert model.config.pos_embed == "stored"
    assert_same_velocity(model, source.sit_velocity)


def test_a_label_table_without_null_row(tmp_path):
    source = SourceSiT(null_row=False)
    torch.save(source.state_dict(), tmp_path / "s.pt")
    model = imported(tmp_path, tmp_path / "s.pt", "sit", num_heads=HEADS, num_classes=CLASSES)
    assert model.num_classes == CLASSES and torch.all(model.label_embed.weight[CLASSES] == 0)
    x, t, _ = inputs()
    y = torch.arange(5)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), source.sit_velocity(x, t, y), atol=2e-5 * 10)


def test_export_then_import_is_the_identity(tmp_path):
    from support import perturbed_dit

    ours = perturbed_dit(0.2, depth=2, in_channels=4, time_scale=-1.0, time_shift=1.0)
    state = export_state(ours, "selfflow-official", learned_sigma=True, linear_patch=True)
    config, back, _ = convert_state(state, "selfflow-official", "memory", num_heads=4)
    assert config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key


def test_bad_layouts_are_named(tmp_path):
    source = SourceSiT()
    state = source.state_dict()
    with pytest.raises(CheckpointError, match="missing t_embedder.mlp.0.weight"):
        convert_state({k: v for k, v in state.items() if not k.startswith("t_embedder")}, "sit", "f.pt", num_heads=HEADS)
    with pytest.raises(CheckpointError, match="blocks.0.attn.q_norm.weight"):
        convert_state({**state, "blocks.0.attn.q_norm.weight": torch.ones(16)}, "sit", "f.pt", num_heads=HEADS)
    with pytest.raises(CheckpointError, match="no weights found"):
        unwrap_state({"optimizer": {}, "epoch": 3}, "f.pt")
    with pytest.raises(Exception, match="--num-heads 5"):
        convert_state(state, "sit", "f.pt", num_heads=5)


def test_cli_import_then_sample(tmp_path, capsys):
    source = SourceSiT()
    torch.save({"ema": source.state_dict(), "args": argparse.Namespace(model="tiny")}, tmp_path / "s.pt")
    assert main(["import", "--ckpt", str(tmp_path / "s.pt"), "--from", "sit", "--out", str(tmp_path / "m"), "--num-heads", str(HEADS)]) == 0
    out = capsys.readouterr().out
    assert "learned-sigma" in out and "--set model.time_scale=-1.0" in out
    assert main(["sample", "--ckpt", str(tmp_path / "m"), "--n", "2", "--out", str(tmp_path / "s"), "--steps", "3",
                 "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert info["sampler"] == "sit_sde" and info["latent"] is True  # published models generate autoencoder latents
    from selfflow.files import load_tensors

    assert load_tensors(tmp_path / "s" / "latents.safetensors")["latents"].shape == (2, CHANNELS, SIZE, SIZE)
    assert main(["import", "--ckpt", str(tmp_path / "s.pt"), "--from", "dit", "--out", str(tmp_path / "x")]) == 2


def test_read_checkpoint_file_reads_both_kinds(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    torch.save({"a": torch.ones(2)}, tmp_path / "a.pt")
    assert torch.equal(read_checkpoint_file(tmp_path / "a.safetensors")["a"], read_checkpoint_file(tmp_path / "a.pt")["a"])


# ---- fine-tuning an imported model -------------------------------------------------------------------
def test_self_flow_fine_tunes_an_imported_sit(tmp_path):
    """2 Self-Flow steps on the digits from an imported 1-channel SiT: the weights start as the import,
    the projection head (absent from the file) is freshly initialised, training moves the model."""
    from support import fit, perturbed_dit, tiny_run

    ours = perturbed_dit(depth=2, time_scale=-1.0, time_shift=1.0)
    torch.save({"ema": export_state(ours, "sit", learned_sigma=True), "args": argparse.Namespace(model="tiny")}, tmp_path / "s.pt")
    import_checkpoint(tmp_path / "s.pt", "sit", tmp_path / "imported", num_heads=4)
    model_section = {"size": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4, "time_scale": -1.0, "time_shift": 1.0}
    run = tiny_run(tmp_path / "run", model=model_section, method={"name": "self_flow"},
                   train={"steps": 2, "init_from": str(tmp_path / "imported"), "lr": 1e-3})
    from selfflow.config import config_from_dict
    from selfflow.trainer import Trainer

    trainer = Trainer(config_from_dict(run))
    for key, value in ours.state_dict().items():
        assert torch.allclose(trainer.model.state_dict()[key], value, atol=0, rtol=0), key
    head = [p for n, p in trainer.method.named_parameters()]
    assert head and all(torch.isfinite(p).all() for p in head)
    trainer.close()
    done = fit(run)
    assert done.step == 2
    moved = max((done.model.state_dict()[k] - v).abs().max().item() for k, v in ours.state_dict().items())
    assert moved > 0
