"""REPA: the alignment loss, the frozen encoders and their token targets, the training-only projector."""

from pathlib import Path

import pytest
from support import LOCAL_INCEPTION
import torch
from torch import nn

from selfflow.config import ConfigError, ModelConfig, config_from_dict
from selfflow.encoders import FeatureNetEncoder, InceptionEncoder, features_to_tokens, load_encoder, train_encoder
from selfflow.methods import Batch, BatchRandom
from selfflow.methods.flow_matching import FlowMatching, FlowMatchingConfig
from selfflow.methods.repa import Repa, RepaConfig
from selfflow.model import DiT

INCEPTION = LOCAL_INCEPTION  # .carry/ or $SELFFLOW_INCEPTION (tests/support.py)
ROOT = Path(__file__).resolve().parents[1]


def tiny_model():
    torch.manual_seed(0)
    return DiT(ModelConfig(size="tiny", depth=3, hidden_size=64, num_heads=4, patch_size=2, image_size=8, in_channels=1, num_classes=10))


def make_batch(size=16, generator_seed=5):
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(generator_seed)
    return Batch(x0=torch.rand(size, 1, 8, 8) * 2 - 1, y=torch.randint(0, 10, (size,)), random=BatchRandom(generator, size, slice(0, size)))


class ConstantEncoder(nn.Module):
    """A frozen 'encoder' whose features are a fixed (d, 4, 4) pattern for every image."""

    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.register_buffer("pattern", torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(3)))

    def forward(self, images):
        return self.pattern.expand(images.shape[0], -1, -1, -1)


class PatternProjector(nn.Module):
    """Ignores the hidden states and returns `scale` × the encoder's per-token pattern."""

    def __init__(self, encoder, scale):
        super().__init__()
        self.encoder, self.scale = encoder, scale

    def forward(self, hidden):
        tokens = features_to_tokens(self.encoder.pattern[None], 4)  # (1, N, d)
        return self.scale * tokens.expand(hidden.shape[0], -1, -1)


@pytest.fixture(scope="module")
def digits_encoder(tmp_path_factory):
    from selfflow.data import load_dataset

    folder = tmp_path_factory.mktemp("enc") / "digits_cnn"
    train_encoder(load_dataset("digits", split="train"), folder, steps=3, widths=(8, 16, 24))
    return folder


def test_alignment_loss_is_zero_when_the_projection_points_along_the_target():
    model = tiny_model()
    encoder = ConstantEncoder()
    method = Repa(RepaConfig(projector_dim=32), model, encoder=encoder)
    method.projector = PatternProjector(encoder, scale=2.5)  # same direction, other length
    loss, logs = method.loss(model, make_batch())
    assert logs["loss_align"].abs().item() < 1e-6
    fm_loss, _ = FlowMatching(FlowMatchingConfig(), model).loss(model, make_batch())
    assert torch.allclose(loss, fm_loss, rtol=1e-6, atol=1e-7)  # the same draws as flow matching
    method.projector = PatternProjector(encoder, scale=-1.0)
    _, logs = method.loss(model, make_batch())
    assert torch.allclose(logs["loss_align"], torch.tensor(2.0))


def test_projector_shape_and_gradients():
    model = tiny_model()
    method = Repa(RepaConfig(projector_dim=32, align_weight=0.5), model, encoder=ConstantEncoder())
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 32), (32, 32), (32, 6)]
    assert method.student_layer == 1  # round(0.3 · 3)
    loss, logs = method.loss(model, make_batch())
    loss.backward()
    assert all(p.grad is not None for p in method.projector.parameters())
    assert all(p.grad is None for p in method.encoder.parameters())
    assert set(method.state_dict()) == {f"projector.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert 0 < logs["loss_align"].item() < 2


def test_features_to_tokens_uses_the_models_token_order():
    model = tiny_model()
    grid = model.grid
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    # A 'feature map' that is the image's top-left pixel of each patch: token i must be patch i.
    feature_map = image[:, :, ::2, ::2]  # (1, 1, 4, 4)
    tokens = features_to_tokens(feature_map, grid)
    assert torch.equal(tokens[0, :, 0], model.patchify(image)[0, :, 0])
    pooled = features_to_tokens(torch.randn(2, 5), grid)
    assert pooled.shape == (2, 16, 5) and torch.equal(pooled[:, 0], pooled[:, 15])
    big = torch.ones(2, 3, 17, 17)
    assert torch.allclose(features_to_tokens(big, 14), torch.ones(2, 196, 3))


def test_feature_net_encoder_gives_spatial_maps(digits_encoder):
    encoder = load_encoder("feature_net", str(digits_encoder), "block2")
    assert isinstance(encoder, FeatureNetEncoder) and encoder.feature_dim == 16
    out = encoder(torch.zeros(3, 1, 8, 8))
    assert out.shape == (3, 16, 4, 4)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert encoder.key["kind"] == "feature_net" and len(encoder.key["sha256"]) == 64
    assert load_encoder("feature_net", str(digits_encoder)).feature_dim == 24  # default: last block


@pytest.mark.skipif(not INCEPTION.is_file(), reason="needs a local fid_inception_v3_fp16.pt")
def test_inception_encoder_exposes_spatial_features():
    spatial = InceptionEncoder(INCEPTION, layer="mixed_7", input_size=75)
    assert spatial.feature_dim == 768
    assert spatial(torch.zeros(2, 1, 8, 8)).shape == (2, 768, 3, 3)
    # layer="pool" is FID's own 2048-d feature, broadcast to every token.
    pooled = InceptionEncoder(INCEPTION, layer="pool", input_size=299)
    full = torch.jit.load(str(INCEPTION)).float().eval()
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        reference = full(torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False))
        assert torch.allclose(pooled(x), reference, atol=1e-4)


def test_repa_trains_with_the_trainer_and_keeps_the_encoder_out_of_checkpoints(tiny_config, tmp_path, digits_encoder):
    from safetensors.torch import load_file

    from selfflow import checkpoint as ckpt
    from selfflow.trainer import Trainer

    method = {"name": "repa", "encoder": "feature_net", "encoder_path": str(digits_encoder), "projector_dim": 32}
    trainer = Trainer(tiny_config(tmp_path, method=method, train={"steps": 2}))
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert "loss_align" in result["last"]
    state = load_file(str(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "method.safetensors"))
    assert state and all(k.startswith("projector.") for k in state)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.encoder"):
        config_from_dict({"method": {"name": "repa", "encoder": "dinov2"}})
    with pytest.raises(ConfigError, match="encoder_input_size"):
        config_from_dict({"method": {"name": "repa", "encoder": "feature_net", "encoder_input_size": 128}})
    config = config_from_dict({"method": {"name": "repa", "encoder_path": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="selfflow eval train-feature-net"):
        Repa(config.method, tiny_model())


def test_the_feature_net_command_trains_repas_encoder(tmp_path, capsys):
    from selfflow.cli import main
    from selfflow.data import load_dataset

    folder = tmp_path / "enc"
    code = main(["eval", "train-feature-net", "--data", "digits", "--out", str(folder), "--train-steps", "3",
                 "--seed", "7", "--widths", "8,16,24", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    encoder = load_encoder("feature_net", str(folder))
    assert encoder.feature_dim == 24 and encoder(torch.zeros(2, 1, 8, 8)).shape == (2, 24, 2, 2)
    # the same seed and widths through the library call give the very same weights
    train_encoder(load_dataset("digits", split="train"), tmp_path / "lib", steps=3, seed=7, widths=(8, 16, 24))
    assert load_encoder("feature_net", str(tmp_path / "lib")).key["sha256"] == encoder.key["sha256"]
    assert main(["eval", "train-feature-net", "--data", "digits", "--out", str(tmp_path / "bad"), "--widths", "8,x"]) == 2
    assert "--widths" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# ---- REPA on captions -----------------------------------------------------------------------------------
class PatchConvEncoder(nn.Module):
    """A frozen random 2×2/stride-2 convolution: one 6-d feature per 2×2 patch of the pixels, on the token grid."""

    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 2, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(4)))
            self.conv.bias.zero_()

    def forward(self, images):
        return self.conv(images)


def test_repa_on_captions_is_flow_matching_plus_the_alignment_computed_by_hand():
    import torch.nn.functional as F

    from selfflow.text.encoders import HashedTextEncoder
    from selfflow.text.model import TextDiT

    torch.manual_seed(0)
    model = TextDiT(ModelConfig(size="tiny", depth=3, hidden_size=64, num_heads=4, patch_size=2, image_size=8, in_channels=1), 32)
    model.set_bank(HashedTextEncoder(32).encode([f"a thin {k}" for k in range(10)]))
    config = RepaConfig(projector_dim=32, align_weight=0.5, class_dropout_prob=0.3, time_distribution="uniform")
    method = Repa(config, model, encoder=PatchConvEncoder())
    batch = make_batch()
    loss, logs = method.loss(model, batch)

    # By hand, the draws in flow matching's order: caption dropout to the null index K, t, ε.
    B, K = 16, model.num_classes
    generator = torch.Generator().manual_seed(5)
    y = torch.where(torch.rand(B, generator=generator) < 0.3, torch.full_like(batch.y, K), batch.y)
    t = torch.rand(B, generator=generator)
    noise = torch.randn(B, 1, 8, 8, generator=generator)
    x_t = (1 - t[:, None, None, None]) * batch.x0 + t[:, None, None, None] * noise
    assert 0 < int((y == K).sum()) < B  # some captions dropped, some kept
    with torch.no_grad():
        pred, hidden = model(x_t, t, y, return_layers=(1,))
        fm = ((pred - (noise - batch.x0)) ** 2).mean()
        # the encoder sees the clean pixels; patch (r, c) of the 4×4 grid is token 4r + c
        patches = batch.x0.unfold(2, 2, 2).unfold(3, 2, 2).reshape(B, 16, 4)  # (B, tokens, 2×2 pixels) in row-major order
        target = patches @ method.encoder.conv.weight.reshape(6, 4).T
        align = (1 - F.cosine_similarity(method.projector(hidden[1]), target, dim=-1)).mean()
    assert method.student_layer == 1
    assert torch.allclose(logs["loss_fm"], fm, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logs["loss_align"], align, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, fm + 0.5 * align, rtol=1e-5, atol=1e-6)


def test_the_shipped_text_repa_config_trains_on_captions(tmp_path, digits_encoder):
    from selfflow.config import load_config
    from support import train_config

    config = load_config(ROOT / "configs" / "digits_text_repa.yaml", [
        "text.encoder=hashed", "text.hashed_dim=32", "text.captions_per_image=1", f"text.cache_dir={tmp_path / 'cache'}",
        f"method.encoder_path={digits_encoder}", "method.encoder_layer=block1", "method.projector_dim=32", "model.depth=2",
        "train.steps=2", "train.batch_size=8", "train.ckpt_every=0", "train.num_sample_images=0", "train.progress=false",
        "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"])
    assert config.method_name() == "repa" and config.text is not None
    trainer, result = train_config(config)
    assert trainer.model.conditions_on_text and trainer.model.num_classes == len(trainer.dataset.texts)
    assert result["step"] == 2 and result["last"]["loss_align"] > 0
