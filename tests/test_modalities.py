"""Video, audio, audio-video and actions on the same model, methods and trainer (selfflow.modalities).

The data generators' own tests are in test_modality_{video,audio,actions}.py; here: tokens, the token
DiT (equal to the image DiT on an image layout), per-modality Self-Flow masks, given-token sampling,
the regression baseline, bit-identical resume for every kind, and the ``selfflow modality`` commands.
"""
import json

import pytest
import torch

from selfflow.cli import main
from selfflow.config import ModelConfig, SelfFlowConfig, config_from_dict
from selfflow.modalities.data import layout_for, match_by_label, modality_samples
from selfflow.modalities.model import TokenDiT
from selfflow.modalities.tokens import Layout, Part, patchify, sincos_nd, unpatchify
from selfflow.model import sincos_2d
from support import fit, one_line_error, perturbed_dit, tiny_run

# CPU-sized data for every kind: 16x16 frames, 16x16 spectrograms, the procedural voice (no espeak-ng needed)
SMALL = {"num_samples": 40, "frames": 4, "frame_size": 16, "video_patch": 4, "video_patch_frames": 2,
         "n_mels": 16, "audio_frames": 16, "audio_source": "procedural", "horizon": 4, "action_patch": 2, "execute": 2}
KINDS = ("video", "audio", "audio_video", "actions")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def raw_run(out_dir, kind, method="self_flow", **train):
    modality = {**SMALL, "kind": kind, "num_samples": 6 if kind == "actions" else 40}
    return tiny_run(out_dir, method={"name": method, **({"class_dropout_prob": 0.0} if kind == "actions" else {})},
                    train={"steps": 4, "batch_size": 8, "num_sample_images": 0, **train}, modality=modality)


def token_model(kind, seed=0):
    config = config_from_dict(tiny_run("unused", modality={**SMALL, "kind": kind}))
    torch.manual_seed(seed)
    cond = 6 if kind == "actions" else 0
    model = TokenDiT(ModelConfig(size="tiny", depth=2, hidden_size=64, num_heads=4, num_classes=10),
                     layout_for(config.modality), cond_dim=cond).eval()
    with torch.no_grad():  # off adaLN-Zero's all-zero start, or every comparison is vacuous
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ---- tokens ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, patch", [((3, 8, 8), (2, 2)), ((1, 4, 8, 8), (2, 4, 4)), ((1, 16, 8), (4, 2)), ((2, 8), (2,))])
def test_patchify_is_invertible_and_puts_each_patch_in_one_token(shape, patch):
    part = Part("x", shape, patch)
    x = torch.randn(3, *shape)
    tokens = patchify(x, part)
    assert tokens.shape == (3, part.num_tokens, part.token_dim)
    assert torch.equal(unpatchify(tokens, part), x)
    # token 0 holds exactly the values of the first patch (the corner), channels last
    corner = x[(slice(None), slice(None), *(slice(0, p) for p in patch))]
    assert torch.equal(tokens[:, 0].sort(dim=1).values, corner.reshape(3, -1).sort(dim=1).values)


def test_image_tokens_and_positions_are_the_image_dits():
    dit = perturbed_dit(image_size=8, in_channels=3, patch_size=2)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(patchify(x, Part("image", (3, 8, 8), (2, 2))), dit.patchify(x))
    assert torch.equal(sincos_nd(64, (4, 6)), sincos_2d(64, 4, 6))


def test_space_time_positions_give_each_axis_its_own_channels():
    table = sincos_nd(96, (2, 3, 4)).reshape(2, 3, 4, 96)  # (frames, rows, columns): 32 channels each, columns first
    assert torch.equal(table[0, :, :, 64:], table[0, 0, 0, 64:].expand(3, 4, 32))  # frame channels: the frame only
    assert torch.equal(table[:, :, 0, :32], table[0, 0, 0, :32].expand(2, 3, 32))  # column channels: the column only
    assert not torch.equal(table[0, 0, 0], table[1, 0, 0])


def test_a_layout_of_two_parts_splits_joins_and_expands_token_values():
    layout = Layout((Part("video", (1, 4, 8, 8), (2, 4, 4)), Part("audio", (1, 8, 8), (4, 4))))
    x = torch.randn(2, *layout.sample_shape)
    assert layout.sample_shape == (4 * 64 + 64,) and layout.num_tokens == 8 + 4
    assert torch.equal(layout.join(layout.split(x)), x)
    assert torch.equal(layout.untokens(layout.tokens(x)), x)
    values = torch.arange(24.0).reshape(2, 12)
    spread = layout.expand_token_values(values)
    for tokens, where in zip(layout.tokens(spread), layout.token_slices()):
        assert torch.equal(tokens, values[:, where, None].expand_as(tokens))  # every value of token i is values[i]
    assert layout.modality_index().tolist() == [0] * 8 + [1] * 4
    assert torch.equal(layout.part(x, "audio"), layout.split(x)[1]) and layout.token_mask("video").tolist() == [True] * 8 + [False] * 4


# ---- the token DiT ---------------------------------------------------------------------------
def test_the_token_dit_on_an_image_layout_is_the_image_dit():
    """Same weights (the patch convolution as a linear map over (p, p, C) tokens) → the same velocity,
    for per-sample and per-token times: the token DiT is the DiT's blocks on any layout."""
    dit = perturbed_dit(image_size=8, in_channels=3, patch_size=2, depth=2)
    model = TokenDiT(dit.config, Layout((Part("image", (3, 8, 8), (2, 2)),))).eval()
    state = {k: v for k, v in dit.state_dict().items()}
    conv = state.pop("patch_embed.weight")
    renamed = {"embeds.0.weight": conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1), "embeds.0.bias": state.pop("patch_embed.bias")}
    for key in list(state):
        if key.startswith("final."):
            renamed["finals.0." + key[len("final."):]] = state.pop(key)
    model.load_state_dict({**state, **renamed})
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 4, 10])
    t = torch.rand(3)
    torch.testing.assert_close(model(x, t, y), dit(x, t, y), rtol=1e-5, atol=1e-6)
    per_token = torch.rand(3, 16)
    torch.testing.assert_close(model(x, per_token, y), dit(x, per_token, y), rtol=1e-5, atol=1e-6)


def test_the_token_dit_conditions_on_labels_times_and_observations():
    av = token_model("audio_video")
    x = torch.randn(2, *av.sample_shape)
    t = torch.full((2,), 0.5)
    v = av(x, t, torch.tensor([3, 3]))
    assert v.shape == x.shape
    assert not torch.allclose(v, av(x, t, torch.tensor([7, 7])))
    assert torch.equal(av(x, t, None), av(x, t, torch.tensor([10, 10])))  # y None = the null label
    # one time on every token is exactly the per-sample path
    torch.testing.assert_close(av(x, t[:, None].expand(2, av.num_tokens), torch.tensor([3, 3])), v, rtol=1e-6, atol=1e-6)
    policy = token_model("actions")
    chunk = torch.randn(2, *policy.sample_shape)
    obs = torch.randn(2, 6)
    assert policy.num_classes == 0 and policy.sample_shape == (2, 4)
    assert not torch.allclose(policy(chunk, t, obs), policy(chunk, t, obs + 1))


def test_modality_embeddings_tell_the_parts_apart():
    av = token_model("audio_video")
    assert av.modality_embed is not None and token_model("video").modality_embed is None
    x = torch.randn(1, *av.sample_shape)
    before = av(x, torch.tensor([0.5]), torch.tensor([2]))
    with torch.no_grad():
        av.modality_embed.weight[1].add_(1.0)
    after = av(x, torch.tensor([0.5]), torch.tensor([2]))
    assert not torch.allclose(before, after)


# ---- methods ---------------------------------------------------------------------------------
def test_self_flow_masks_each_modality_with_its_own_ratio():
    from selfflow.methods.base import Batch, BatchRandom
    from selfflow.methods.self_flow import draw_dual_timesteps

    av = token_model("audio_video")
    x0 = torch.randn(6, *av.sample_shape)
    batch = Batch(x0=x0, y=torch.zeros(6, dtype=torch.long), random=BatchRandom(torch.Generator().manual_seed(0), 6, slice(0, 6)))
    config = SelfFlowConfig(video_mask_ratio=0.25, audio_mask_ratio=0.5)
    draw = draw_dual_timesteps(config, batch, av)
    video, audio = av.layout.token_slices()
    assert (video.stop - video.start, audio.stop - audio.start) == (32, 16)
    assert (draw.mask[:, video].sum(1) == 8).all() and (draw.mask[:, audio].sum(1) == 8).all()
    # each value of the sample carries its token's time
    for tokens, where in zip(av.layout.tokens(draw.pixel_times), av.layout.token_slices()):
        assert torch.equal(tokens, draw.token_times[:, where, None].expand_as(tokens))


def _av_draw(config, size=6, seed=0):
    from selfflow.methods.base import Batch, BatchRandom
    from selfflow.methods.self_flow import draw_dual_timesteps

    av = token_model("audio_video")
    batch = Batch(x0=torch.randn(size, *av.sample_shape), y=torch.zeros(size, dtype=torch.long),
                  random=BatchRandom(torch.Generator().manual_seed(seed), size, slice(0, size)))
    return av, draw_dual_timesteps(config, batch, av)


def _whole_part(draw, av) -> torch.Tensor:
    """(B,) the part index whose tokens are exactly the mask, −1 where the mask is no whole part."""
    out = torch.full((draw.mask.shape[0],), -1)
    for k, where in enumerate(av.layout.token_slices()):
        part = torch.zeros_like(draw.mask[0])
        part[where] = True
        out[(draw.mask == part).all(1)] = k
    return out


def test_whole_part_times_give_one_modality_its_own_time_and_the_other_one_time():
    """p = 1, q = 1: in every sample one whole part (both occur) is at time exactly 0 — cross-modal
    generation's given part — and every token of the other at the sample's t; the teacher sees time 0."""
    av, draw = _av_draw(SelfFlowConfig(whole_part_prob=1.0, whole_part_clean_prob=1.0), size=64)
    which = _whole_part(draw, av)
    assert bool((which >= 0).all()) and set(which.tolist()) == {0, 1}
    assert bool((draw.token_times[draw.mask] == 0).all()) and bool((draw.teacher_times == 0).all())
    assert torch.equal(draw.token_times[~draw.mask], draw.t[:, None].expand_as(draw.token_times)[~draw.mask])
    # q = 0: the part's time is a fresh draw from p(t), constant over the part, not t
    av, draw = _av_draw(SelfFlowConfig(whole_part_prob=1.0, whole_part_clean_prob=0.0), size=64)
    assert bool((_whole_part(draw, av) >= 0).all()) and bool((draw.s > 0).all()) and not torch.equal(draw.s, draw.t)
    assert torch.equal(draw.token_times[draw.mask], draw.s[:, None].expand_as(draw.token_times)[draw.mask])


def test_whole_part_times_come_with_probability_p_and_clean_with_q():
    av, draw = _av_draw(SelfFlowConfig(whole_part_prob=0.3, whole_part_clean_prob=0.5), size=4000)
    whole = _whole_part(draw, av) >= 0  # the 0.10 / 0.50 in-part masks are never a whole part
    assert abs(float(whole.float().mean()) - 0.3) < 0.03
    clean = draw.s[whole] == 0
    assert abs(float(clean.float().mean()) - 0.5) < 0.05 and not bool((draw.s[~whole] == 0).any())
    # p = 0 draws nothing more: the default's draws are the ones without the option
    _, plain = _av_draw(SelfFlowConfig(), size=32)
    _, zero = _av_draw(SelfFlowConfig(whole_part_prob=0.0, whole_part_clean_prob=1.0), size=32)
    assert torch.equal(plain.token_times, zero.token_times) and torch.equal(plain.noise, zero.noise)


def test_whole_part_times_do_not_depend_on_how_the_batch_is_split():
    from selfflow.methods.base import Batch, BatchRandom
    from selfflow.methods.self_flow import draw_dual_timesteps

    av, whole = _av_draw(SelfFlowConfig(whole_part_prob=0.5), size=8, seed=3)
    x0 = torch.randn(8, *av.sample_shape)
    parts = []
    for rows in (slice(0, 4), slice(4, 8)):
        batch = Batch(x0=x0[rows], y=torch.zeros(4, dtype=torch.long), random=BatchRandom(torch.Generator().manual_seed(3), 8, rows))
        parts.append(draw_dual_timesteps(SelfFlowConfig(whole_part_prob=0.5), batch, av))
    assert torch.equal(whole.token_times, torch.cat([p.token_times for p in parts]))


def test_whole_part_times_need_several_parts():
    from selfflow.config import ConfigError
    from selfflow.methods.self_flow import SelfFlow

    with pytest.raises(ConfigError, match="whole_part_prob=0.5 needs a sequence of several parts"):
        SelfFlow(SelfFlowConfig(whole_part_prob=0.5), token_model("audio"))
    with pytest.raises(ConfigError, match="whole_part_clean_prob"):
        config_from_dict(tiny_run("unused", method={"name": "self_flow", "whole_part_clean_prob": 1.5}))


def test_regression_loss_and_policy_are_one_step_from_zero():
    from selfflow.config import RegressionConfig
    from selfflow.methods.base import Batch, BatchRandom
    from selfflow.methods.regression import Regression
    from selfflow.modalities.sampling import make_policy

    model = token_model("actions")
    x0, obs = torch.rand(4, 2, 4) * 2 - 1, torch.randn(4, 6)
    loss, _ = Regression(RegressionConfig(), model).loss(model, Batch(x0=x0, y=obs, random=BatchRandom(torch.Generator().manual_seed(0), 4, slice(0, 4))))
    with torch.no_grad():
        v = model(torch.zeros_like(x0), torch.ones(4), obs)
        torch.testing.assert_close(loss, (v + x0).pow(2).mean())
        torch.testing.assert_close(make_policy(model, regression=True)(obs), (-v).clamp(-1, 1))


def test_given_tokens_are_kept_and_steer_the_rest():
    from selfflow.modalities.sampling import generate_given

    av = token_model("audio_video")
    real = modality_samples(config_from_dict(tiny_run("unused", modality={**SMALL, "kind": "audio_video"})), "test", n=2)
    audio_tokens = av.modality_index == 1
    video_part = av.layout.parts[0].numel
    for mode in ("clean", "replace"):
        made = generate_given(av, real.x, audio_tokens, seeds=[0, 1], labels=real.y, steps=3, mode=mode)
        assert torch.equal(made[:, video_part:], real.x[:, video_part:])  # the given sound, exactly
        other = generate_given(av, real.x.flip(0), audio_tokens, seeds=[0, 1], labels=real.y, steps=3, mode=mode)
        assert not torch.allclose(made[:, :video_part], other[:, :video_part])  # another sound: another picture


# ---- data --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_each_kinds_data_is_deterministic_and_shaped_by_its_layout(kind):
    config = config_from_dict(raw_run("unused", kind))
    a, b = modality_samples(config, "train", progress=False), modality_samples(config, "train", progress=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.shape[1:] == layout_for(config.modality).sample_shape
    assert a.x.min() >= -1 and a.x.max() <= 1
    if kind != "actions":
        assert not torch.equal(modality_samples(config, "test", progress=False).x, a.x)


def test_audio_video_pairs_are_in_sync_and_the_measure_sees_it():
    """The digit appears at frame a_i and the word starts at a_i · 0.8 s / T: the measured offset of real pairs
    is within half a frame; pairing each clip with another's sound breaks it."""
    from selfflow.modalities import sync

    config = config_from_dict(tiny_run("unused", modality={**SMALL, "kind": "audio_video", "frames": 8, "num_samples": 40}))
    data = modality_samples(config, "train", progress=False)
    video, audio = data.layout.part(data.x, "video"), data.layout.part(data.x, "audio")
    appear = sync.appear_frames(40, 8, config.modality.seed)
    assert set(appear.tolist()) == {1, 2, 3} and torch.equal(appear[:5], sync.appear_frames(5, 8, config.modality.seed))
    assert torch.equal(sync.video_event_frames(video), appear)  # blank before a_i, the digit from a_i on
    assert bool((video[torch.arange(40), 0, appear - 1] == -1).all())
    real = sync.sync_measures(video, audio, 0.8)
    assert real["sync_rate"] == 1.0 and real["sync_offset"] < 0.03
    shuffled = sync.sync_measures(video, audio.roll(1, 0), 0.8)
    assert shuffled["sync_rate"] < 0.7 and shuffled["sync_offset"] > 2 * real["sync_offset"]


def test_align_onsets_moves_each_word_to_its_target_sample():
    from selfflow.modalities import sync

    waves = torch.zeros(3, 100)
    waves[0, 10:20], waves[1, 0:30], waves[2, 50:90] = 1.0, 2.0, 3.0
    moved = sync.align_onsets(waves, torch.tensor([0, 40, 80]))
    assert sync.onset_samples(moved).tolist() == [0, 40, 80]
    assert moved[0, :10].eq(1).all() and moved[1, 40:70].eq(2).all() and moved[2, 80:].eq(3).all()  # cut at the end


def test_audio_and_video_tokens_share_one_time_axis():
    """The first channel share is the token's time in seconds-like units shared by both parts: a video token and
    an audio token whose spans have the same centre get the same values there; the other shares their own axes."""
    av = token_model("audio_video")  # video grid (2, 4, 4): 2 time steps; audio grid (4, 4): 4 time steps
    table = av.pos_embed[0]
    video, audio = av.layout.token_slices()
    share = 2 * (64 // 6)
    v, a = table[video].reshape(2, 4, 4, 64), table[audio].reshape(4, 4, 64)
    from selfflow.modalities.tokens import sincos_1d

    assert torch.equal(v[1, 2, 3, :share], v[1, 0, 0, :share])  # time channels: the time only
    torch.testing.assert_close(v[:, 0, 0, :share], sincos_1d(share, torch.tensor([0.5, 2.5])).float())  # centres 0.5, 2.5
    torch.testing.assert_close(a[0, :, :share], sincos_1d(share, torch.arange(4.0)).float())
    assert not torch.equal(a[0, 0, share:2 * share], a[1, 0, share:2 * share])  # the mel axis has its own channels
    assert Layout.from_dict(av.layout.to_dict()) == av.layout  # the time axes travel with the layout
    assert "time_axis" not in Layout((Part("x", (1, 4), (2,)),)).to_dict()["parts"][0]  # older layouts read the same
    # one part: the part's own grid, as before
    assert torch.equal(token_model("video").pos_embed[0], sincos_nd(64, token_model("video").layout.parts[0].grid))


def test_audio_video_pairs_a_clip_with_an_utterance_of_its_digit():
    labels, pool = torch.tensor([3, 1, 3, 3]), torch.tensor([1, 3, 5, 3])
    index = match_by_label(labels, pool)
    assert torch.equal(pool[index], labels) and index.tolist() == [1, 0, 3, 1]


# ---- trainer: every kind trains and resumes bit-identically ------------------------------------
@pytest.mark.parametrize("kind, method", [("video", "self_flow"), ("audio", "flow_matching"), ("audio_video", "self_flow"),
                                          ("actions", "self_flow"), ("actions", "regression")])
def test_each_kind_resumes_bit_identically(tmp_path, kind, method):
    from selfflow import checkpoint as ckpt

    straight = fit(raw_run(tmp_path / "straight", kind, method, ckpt_every=2))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_0000002", tmp_path / "resumed" / "checkpoints" / "step_0000002")
    resumed = fit(raw_run(tmp_path / "resumed", kind, method, ckpt_every=2))
    a = ckpt.load_tensors(tmp_path / "straight" / "checkpoints" / "step_0000004" / "model.safetensors")
    b = ckpt.load_tensors(tmp_path / "resumed" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.model.layout == resumed.model.layout and not straight.model.patch_conv


# ---- the commands ------------------------------------------------------------------------------
def _write(tmp_path, raw) -> str:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_audio_video_trains_samples_and_evaluates_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", _write(tmp_path, raw_run(run, "audio_video", num_sample_images=2))]) == 0
    assert (run / "samples" / "step_0000004.gif").is_file() and (run / "samples" / "step_0000004_0.wav").is_file()
    capsys.readouterr()
    assert main(["modality", "sample", "--ckpt", str(run), "--n", "2", "--given", "audio", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.gif").is_file() and (tmp_path / "s" / "real_0.wav").is_file()
    out = tmp_path / "report.json"
    assert main(["modality", "eval", "--ckpt", str(run), "--n", "8", "--judge-steps", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("agreement", "video_given_audio_accuracy", "audio_given_video_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert {"fd_frames", "temporal_consistency", "smoothness"} <= set(report["video"]) and {"accuracy", "fd"} <= set(report["audio"])


def test_a_policy_trains_and_reports_its_success_rate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", _write(tmp_path, raw_run(run, "actions"))]) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert main(["modality", "eval", "--ckpt", str(run), "--n", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["episodes"] == 3 and 0.0 <= result["success_rate"] <= 1.0


def test_modality_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    image_run = tmp_path / "image"
    fit(tiny_run(image_run, train={"steps": 2}))
    video_run = tmp_path / "video"
    fit(raw_run(video_run, "video", steps=2))
    capsys.readouterr()
    assert main(["modality", "sample", "--ckpt", str(image_run), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "not a modality model")
    assert main(["sample", "--ckpt", str(video_run), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "selfflow modality sample")
    assert main(["modality", "sample", "--ckpt", str(video_run), "--given", "audio", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "--given audio", "video")
    assert main(["modality", "eval", "--ckpt", str(video_run), "--n", "0"]) == 2
    one_line_error(capsys, "--n")
    assert not (tmp_path / "o").exists()


# ---- many processes: DDP and FSDP on a two-part sequence equal one process ---------------------
def test_audio_video_under_ddp_and_fsdp_matches_one_process(tmp_path):
    from selfflow import checkpoint as ckpt
    from support import fit_phases, free_port, logged_losses, spawn_ranks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(raw_run(tmp_path / "one", "audio_video", batch_size=8))
    finally:
        torch.set_num_threads(threads)
    phases = [(free_port(), raw_run(tmp_path / mode, "audio_video", batch_size=8, distributed=mode)) for mode in ("ddp", "fsdp")]
    spawn_ranks(fit_phases, 2, 2, phases)
    reference = ckpt.load_tensors(tmp_path / "one" / "checkpoints" / "step_0000004" / "ema.safetensors")
    for mode in ("ddp", "fsdp"):
        assert logged_losses(tmp_path / mode) == pytest.approx(logged_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
        ema = ckpt.load_tensors(tmp_path / mode / "checkpoints" / "step_0000004" / "ema.safetensors")
        for key in reference:
            torch.testing.assert_close(ema[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_an_exported_modality_model_samples_and_evaluates_like_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    fit(raw_run(run, "actions", steps=2))
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "exported")]) == 0
    meta = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert meta["modality"]["kind"] == "actions" and meta["run"]["method"]["name"] == "self_flow"
    from selfflow.modalities.model import load_token_generator

    a, *_ = load_token_generator(run)
    b, *_ = load_token_generator(tmp_path / "exported")
    obs = torch.randn(3, 6)
    x = torch.randn(3, *a.sample_shape)
    assert torch.equal(a(x, torch.full((3,), 0.3), obs), b(x, torch.full((3,), 0.3), obs))
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert main(["modality", "eval", "--ckpt", str(tmp_path / "exported"), "--n", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["episodes"] == 2
