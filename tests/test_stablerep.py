"""StableRep (docs/methods.md#stablerep): the multi-positive loss, its DDP all-gather, the probes, the
captioned synthetic sets and the representation methods on the one trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from selfflow import checkpoint as ckpt
from selfflow.represent.losses import info_nce, multi_positive_loss, stablerep_loss
from selfflow.represent.probes import knn_probe, linear_probe
from support import fit, free_port, join_as_rank, leave_process_group_env, one_line_error, perturbed_dit, spawn_ranks, tiny_run


def _loss(z, ids, tau=0.1):
    return multi_positive_loss(z, z, ids, ids, torch.arange(len(z)), tau)[0]


# ---- the loss ----------------------------------------------------------------------------
def test_loss_equals_a_hand_computed_value():
    # z1 = (1, 0), z2 = (0, 1), z3 = (-1, 0) (unnormalised scales must not matter); captions 0, 0, 1
    z = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-3.0, 0.0]])
    ids = torch.tensor([0, 0, 1])
    # anchor 1: logits to 2, 3 = 0, -1/τ; its positive is 2 → log(1 + e^{-10})
    # anchor 2: logits to 1, 3 = 0, 0; positive 1 → log 2
    # anchor 3: no other image of caption 1 → no target, left out of the mean
    expected = (math.log(1 + math.exp(-10.0)) + math.log(2.0)) / 2
    assert _loss(z, ids).item() == pytest.approx(expected, rel=1e-6)


def test_with_two_images_per_caption_it_is_simclr_infonce():
    torch.manual_seed(0)
    v1, v2 = torch.randn(6, 8), torch.randn(6, 8)
    ids = torch.cat([torch.arange(6), torch.arange(6)])
    torch.testing.assert_close(_loss(torch.cat([v1, v2]), ids), info_nce(v1, v2))


def test_self_is_excluded_from_logits_and_positives():
    """A plain loop over anchors and positives, self left out, gives the same value; putting self back
    into the logits (its similarity 1/τ = 10 is the largest) changes it by far."""
    torch.manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    expected, anchors = 0.0, 0
    for i in range(7):
        others = [j for j in range(7) if j != i]
        positives = [j for j in others if ids[j] == ids[i]]
        if not positives:
            continue
        log_norm = torch.logsumexp(torch.stack([z[i] @ z[j] / 0.1 for j in others]), 0)
        expected += -sum((z[i] @ z[j] / 0.1 - log_norm) for j in positives) / len(positives)
        anchors += 1
    assert _loss(z, ids).item() == pytest.approx(float(expected) / anchors, rel=1e-5)
    with_self = torch.log_softmax(z @ z.T / 0.1, dim=1)
    assert abs(_loss(z, ids).item() - float(-with_self[0, 1])) > 1.0


def _gather_worker(rank, world, port, z, ids, out):
    join_as_rank(rank, world, port)
    torch.distributed.init_process_group("gloo")
    n = len(z) // world
    mine = z[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    loss, _ = stablerep_loss(mine, ids[rank * n : (rank + 1) * n])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_all_gather_keeps_gradients_across_two_processes(tmp_path):
    """Each process's loss is the mean over its own anchors against every process's keys; DDP averages
    the processes' gradients, so rank 0's embedding gradient / world size must equal the 1-process
    gradient of the whole batch's loss on those rows (and the mean of the losses, its loss)."""
    torch.manual_seed(0)
    z, ids = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # every caption spans both processes
    full = z.clone().requires_grad_(True)
    loss, _ = stablerep_loss(full, ids)
    loss.backward()
    spawn_ranks(_gather_worker, 2, 2, free_port(), z, ids, str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert (parts[0]["loss"] + parts[1]["loss"]).item() / 2 == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(parts[0]["grad"] / 2, full.grad[:4])
    torch.testing.assert_close(parts[1]["grad"] / 2, full.grad[4:])
    assert parts[0]["grad"].abs().sum() > 0


# ---- probes --------------------------------------------------------------------------------
def test_linear_probe_and_knn_on_separable_features_are_perfect():
    g = torch.Generator().manual_seed(0)
    centres = 6 * torch.eye(4)[:3]
    y_train, y_test = torch.arange(300) % 3, torch.arange(90) % 3
    x_train = centres[y_train] + 0.5 * torch.randn(300, 4, generator=g)
    x_test = centres[y_test] + 0.5 * torch.randn(90, 4, generator=g)
    assert linear_probe(x_train, y_train, x_test, y_test, 3)["accuracy"] == 1.0
    assert knn_probe(x_train, y_train, x_test, y_test, 3, k=5) == 1.0


def test_linear_probe_reaches_the_bayes_accuracy_of_two_overlapping_gaussians():
    """N(−1, 1) against N(+1, 1) in one feature: the best classifier is the sign, accuracy Φ(1) = 0.8413."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20000) % 2
    x = (2.0 * y - 1.0)[:, None] + torch.randn(20000, 1, generator=g)
    result = linear_probe(x[:10000], y[:10000], x[10000:], y[10000:], 2)
    assert result["converged"]
    assert result["accuracy"] == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), abs=0.012)


def test_the_lbfgs_fit_is_the_regularised_optimum():
    """At the minimum of mean CE + λ/2‖W‖² the gradient vanishes: X^T (softmax − onehot)/n + λW = 0, Σ_i (p_i − y_i) = 0."""
    from selfflow.represent.probes import fit_logistic

    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    y = (x[:, :3] + 0.8 * torch.randn(400, 3, generator=g, dtype=torch.float64)).argmax(1)
    weight, bias, iterations = fit_logistic(x, y, 3, 1e-2, tolerance=1e-9)
    residual = torch.softmax(x @ weight + bias, 1) - F.one_hot(y, 3).double()
    assert 0 < iterations < 1000
    torch.testing.assert_close(x.T @ residual / 400 + 1e-2 * weight, torch.zeros(6, 3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(residual.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_the_probe_chooses_its_l2_strength_on_held_out_train_images_never_on_test():
    from selfflow.represent.probes import fit_logistic, standardise

    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, 20, generator=g)
    y = (x[:, :4] + 1.5 * torch.randn(700, 4, generator=g)).argmax(1)  # noisy: the L2 strength matters
    train_x, train_y, test_x, test_y = x[:500], y[:500], x[500:], y[500:]
    decays = (1e-4, 1e-2, 1.0, 10.0)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, weight_decays=decays)
    assert set(result["holdout_accuracy"]) == set(decays) and result["holdout_images"] == 50
    assert result["holdout_accuracy"][result["weight_decay"]] == max(result["holdout_accuracy"].values())
    # the test split changes nothing of the choice: other test labels, other test features
    for other_x, other_y in ((test_x, test_y.flip(0)), (torch.randn(200, 20, generator=g), torch.randint(0, 4, (200,), generator=g))):
        again = linear_probe(train_x, train_y, other_x, other_y, 4, weight_decays=decays)
        assert {k: again[k] for k in ("weight_decay", "holdout_accuracy", "iterations")} == \
               {k: result[k] for k in ("weight_decay", "holdout_accuracy", "iterations")}
    # the test accuracy is that of the refit on the whole train split with the chosen strength
    a, b = standardise(train_x, test_x)
    weight, bias, _ = fit_logistic(a, train_y, 4, result["weight_decay"])
    assert result["accuracy"] == float(((b.double() @ weight + bias).argmax(1) == test_y).float().mean())


# ---- synthetic sets --------------------------------------------------------------------------
def test_instances_share_their_initial_noise_and_differ_by_the_sde_churn(tmp_path):
    from selfflow.data.synth import load_synth
    from selfflow.represent.synth import make_synth_set

    model = perturbed_dit()
    common = dict(captions="variations", per_caption=3, num=12, shard_size=6, sampler="sde", steps=6, batch_size=4)
    make_synth_set(model, tmp_path / "calm", churn=1e-6, **common)  # no step has t <= churn: no SDE noise
    make_synth_set(model, tmp_path / "churn", churn=1.0, **common)
    calm, churn = load_synth(tmp_path / "calm"), load_synth(tmp_path / "churn")
    assert len(calm) == 4 and calm.per_caption == 3
    assert calm.captions.tolist() == [g for g in range(4) for _ in range(3)]
    assert calm.labels.tolist() == [g % 10 for g in range(4) for _ in range(3)]
    groups = calm.images.reshape(4, 3, -1)
    assert torch.equal(groups[:, 0], groups[:, 1]) and torch.equal(groups[:, 0], groups[:, 2])  # shared noise, no churn
    assert not torch.equal(groups[0, 0], groups[1, 0])
    moved = churn.images.reshape(4, 3, -1).float()
    assert (moved[:, 0] - moved[:, 1]).abs().mean() > 1.0  # the churn separates them


def test_a_synth_set_resumed_after_a_lost_shard_is_bit_identical(tmp_path):
    from selfflow.represent.synth import make_synth_set

    model = perturbed_dit()
    kw = dict(captions="classes", per_caption=2, num=8, shard_size=4, sampler="euler", steps=3, batch_size=3)
    make_synth_set(model, tmp_path / "a", **kw)
    shard = tmp_path / "a" / "shard_00001.safetensors"
    whole = shard.read_bytes()
    shard.unlink()
    make_synth_set(model, tmp_path / "a", **kw)
    assert shard.read_bytes() == whole
    make_synth_set(model, tmp_path / "b", **{**kw, "batch_size": 8})
    assert (tmp_path / "b" / "shard_00001.safetensors").read_bytes() == whole  # independent of the batch


# ---- caption identity ------------------------------------------------------------------------
def _positives(method_name: str, data, groups, **method):
    """The positives per anchor that ``method_name``'s loss sees in a real batch of ``groups`` of ``data``."""
    from selfflow.config import config_from_dict
    from selfflow.methods import Batch, BatchRandom, build_method, build_network
    from selfflow.trainer import resolve_config

    raw = tiny_run("unused", method={"name": method_name, "encoder": "vit", "head_hidden": 16, "embed_dim": 8, **method},
                   data={"name": "synth", "path": data.source}, train={"batch_size": len(groups)})
    config = resolve_config(config_from_dict(raw), data)
    torch.manual_seed(0)
    encoder = build_network(config)
    m = build_method(config.method, encoder)
    m.bind_data(data)
    x0, ids = data.get_batch(torch.as_tensor(groups))
    _, logs = m.loss(encoder, Batch(x0=x0, y=ids, random=BatchRandom(torch.Generator().manual_seed(0), len(groups), slice(0, len(groups)))))
    return float(logs["positives"]), ids


@pytest.mark.parametrize("captions,sampler", [("classes", "euler"), ("variations", "sde")])
def test_a_caption_row_is_one_identity_with_m_minus_1_positives(tmp_path, captions, sampler):
    """40 rows of m = 4 images from a 10-class generator: a batch of 30 rows holds several rows of each class,
    yet every anchor has exactly m − 1 = 3 positives (its own row's other draws); SupCon, on the same batch,
    counts the whole class."""
    from selfflow.data.synth import load_synth
    from selfflow.represent.synth import make_synth_set

    make_synth_set(perturbed_dit(), tmp_path / "set", captions=captions, per_caption=4, num=160, sampler=sampler, steps=2)
    data = load_synth(tmp_path / "set")
    groups = list(range(3, 33))
    positives, ids = _positives("stablerep", data, groups)
    assert positives == 3.0
    assert ids.tolist() == [[g] * 4 for g in groups]
    per_class = torch.bincount(data.group_labels[groups], minlength=10).float()
    assert per_class.max() >= 3  # rows of one class share a batch: the class is not the identity
    if captions == "classes":
        expected = float((per_class[data.group_labels[groups]] * 4 - 1).mean())  # every image of the anchor's class
        assert _positives("supcon", data, groups)[0] == expected > 3
        # k = 2 of the m = 4 images per row and batch: one positive each
        assert _positives("stablerep", data, groups, images_per_caption=2)[0] == 1.0


def test_the_old_instances_name_is_refused_with_its_new_name():
    from selfflow.errors import ConfigError
    from selfflow.represent.synth import plan

    with pytest.raises(ConfigError, match="renamed variations"):
        plan("instances", 4, 8, 10, "sde", 4)


def test_stablerep_refuses_labelled_images_and_points_to_supcon():
    from selfflow.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="supcon"):
        config_from_dict({"method": {"name": "stablerep"}, "data": {"name": "digits"}})


# ---- training ------------------------------------------------------------------------------
def _synth(tmp_path):
    from selfflow.represent.synth import make_synth_set

    make_synth_set(perturbed_dit(), tmp_path / "set", captions="classes", per_caption=4, num=64, sampler="euler", steps=2)
    return tmp_path / "set"


def _encoder_run(out, method, data=None, **train):
    return tiny_run(out, method={"name": method, "encoder": "vit", "head_hidden": 32, "embed_dim": 16},
                    data=data or {"name": "digits"}, train={"steps": 6, "batch_size": 8, **train})


def test_represent_resume_is_bit_identical(tmp_path):
    data = {"name": "synth", "path": str(_synth(tmp_path))}
    straight = fit(_encoder_run(tmp_path / "a", "stablerep", data))
    fit(_encoder_run(tmp_path / "b", "stablerep", data, steps=3))
    resumed = fit(_encoder_run(tmp_path / "b", "stablerep", data))
    for module in ("model", "method"):
        a = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints") / f"{module}.safetensors")
        b = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints") / f"{module}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), module
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


@pytest.mark.parametrize("method,encoder", [("simclr", "resnet"), ("supervised", "resnet"), ("supcon", "vit")])
def test_each_method_lowers_its_loss_on_digits(tmp_path, method, encoder):
    raw = _encoder_run(tmp_path, method, steps=30, batch_size=32, lr=3e-3, log_every=1)
    raw["method"].update(encoder=encoder, width=8)
    fit(raw)
    from support import logged_losses

    losses = logged_losses(tmp_path)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_a_stride_2_stem_is_the_stride_1_stem_read_at_every_other_pixel():
    from selfflow.represent.encoders import ResNetEncoder

    torch.manual_seed(0)
    full, early = ResNetEncoder(28, 1, 8), ResNetEncoder(28, 1, 8, stem_stride=2)
    early.load_state_dict(full.state_dict())  # the same weights: only the stride differs
    x = torch.randn(3, 1, 28, 28)
    conv_full, conv_early = full.stem[0](x), early.stem[0](x)
    assert conv_early.shape == (3, 8, 14, 14)
    torch.testing.assert_close(conv_early, conv_full[:, :, ::2, ::2])
    assert early(x).shape == full(x).shape == (3, 32)


def _ddp_worker(rank, world, port, raw):
    join_as_rank(rank, world, port)
    fit(raw)


def test_two_process_stablerep_matches_one_process(tmp_path):
    threads = torch.get_num_threads()
    data = {"name": "synth", "path": str(_synth(tmp_path))}
    try:
        _ddp_worker(0, 1, free_port(), _encoder_run(tmp_path / "one", "stablerep", data, steps=3))
        leave_process_group_env()
    finally:
        torch.set_num_threads(threads)
    spawn_ranks(_ddp_worker, 2, 2, free_port(), _encoder_run(tmp_path / "two", "stablerep", data, steps=3))
    a = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "one" / "checkpoints") / "model.safetensors")
    b = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints") / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


# ---- the command line --------------------------------------------------------------------------
@pytest.fixture
def generator_dir(tmp_path):
    perturbed_dit().save_pretrained(tmp_path / "gen")
    return tmp_path / "gen"


def test_synth_refuses_text_captions_naming_the_file(tmp_path, capsys, generator_dir):
    from selfflow.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a seven\na thin one\n")
    argv = ["synth", "--ckpt", str(generator_dir), "--captions", str(captions), "--per-caption", "2", "--n", "4",
            "--out", str(tmp_path / "s"), "--device", "cpu"]
    assert main(argv) == 2
    one_line_error(capsys, str(captions), "2 text captions", "caption-conditioned generator")
    assert not (tmp_path / "s").exists()
    argv[argv.index("--captions") + 1] = "variations"
    assert main(argv + ["--sampler", "euler"]) == 2
    one_line_error(capsys, "--captions variations", "--sampler sde")
    argv[argv.index("--n") + 1] = "5"
    assert main(argv) == 2
    one_line_error(capsys, "--n 5", "--per-caption 2")


def test_synth_then_represent_train_and_probe(tmp_path, capsys, generator_dir):
    import json

    import yaml

    from selfflow.cli import main

    assert main(["synth", "--ckpt", str(generator_dir), "--captions", "classes", "--per-caption", "2", "--n", "40",
                 "--out", str(tmp_path / "s"), "--steps", "2", "--device", "cpu"]) == 0
    raw = _encoder_run(tmp_path / "run", "stablerep", {"name": "synth", "path": str(tmp_path / "s")}, steps=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["represent", "train", "--config", str(tmp_path / "c.yaml")]) == 0
    assert main(["represent", "probe", "--config", str(tmp_path / "c.yaml"), "--max-iter", "30", "--few-shot", "1,2",
                 "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert 0 <= result["linear"] <= 1 and set(result["few_shot"]) == {"1", "2"}
    raw["method"]["name"] = "supervised"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["represent", "train", "--config", str(tmp_path / "bad.yaml")]) == 2
    one_line_error(capsys, "supervised", "synth")


@pytest.mark.parametrize("key,value,needle", [("method.encoder", "cnn", "method.encoder"), ("method.temperature", "0", "method.temperature"),
                                              ("train.init_from", "runs/x", "train.init_from"), ("data.name", "pairs", "data.name=pairs"),
                                              ("method.stem_stride", "3", "method.stem_stride")])
def test_represent_config_errors_name_the_key(key, value, needle):
    from selfflow.config import ConfigError, config_from_dict
    from selfflow.config import apply_overrides

    raw = apply_overrides({"method": {"name": "stablerep"}, "data": {"name": "synth", "path": "somewhere"}}, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw)
