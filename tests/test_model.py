"""The per-token DiT: equivalences that must hold exactly, and its file format."""
import pytest
import torch

from selfflow.checkpoint import CheckpointError
from selfflow.config import ModelConfig
from selfflow.model import DiT
from support import perturbed_dit


def test_zero_initialised_output():
    torch.manual_seed(0)
    model = DiT(ModelConfig(size="tiny", depth=2, hidden_size=64, num_heads=4, image_size=8, in_channels=1, num_classes=10))
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_patchify_round_trip_and_token_order():
    model = perturbed_dit(in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    # token k covers rows (k // grid)·p … and columns (k % grid)·p … (row-major)
    tmap = torch.zeros(1, 1, 8, 8)
    tmap[:, :, 2:4, 6:8] = 1.0  # grid row 1, column 3 → token 1·4 + 3 = 7
    tokens = model.token_times(tmap)
    assert tokens.shape == (1, 16) and tokens[0].nonzero().flatten().tolist() == [7]


@pytest.mark.parametrize("dedupe", [True, False])
def test_per_token_equals_scalar_time_when_tokens_share_t(dedupe):
    model = perturbed_dit()
    model.dedupe_times = dedupe
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 10, 7])
    scalar = model(x, t, y)
    per_token = model(x, t[:, None].expand(4, model.num_tokens).contiguous(), y)
    torch.testing.assert_close(per_token, scalar, rtol=1e-5, atol=1e-6)


def test_deduplicated_conditioning_equals_full_per_token():
    model = perturbed_dit()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    t = torch.rand(3, 1).expand(3, 16).clone()
    t[:, ::3] = torch.rand(3, 1)  # two distinct times per sample, as Self-Flow uses
    model.dedupe_times = True
    fast = model(x, t, y)
    model.dedupe_times = False
    slow = model(x, t, y)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_token_time_changes_only_through_that_token():
    """A token's time enters the network only through that token's modulation."""
    model = perturbed_dit(depth=1)
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([4])
    t = torch.full((1, 16), 0.5)
    _, h1 = model(x, t, y, return_layers=(1,))
    t2 = t.clone()
    t2[0, 5] = 0.9
    _, h2 = model(x, t2, y, return_layers=(1,))
    changed = (h1[1] - h2[1]).abs().amax(-1)[0] > 1e-6
    # Attention mixes tokens, so all may change; but with the token's own gate/shift it must change.
    assert changed[5]


def test_return_layers_and_stop_after_agree_with_full_forward():
    model = perturbed_dit(depth=4)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10])
    out, hidden = model(x, t, y, return_layers=(1, 3))
    torch.testing.assert_close(out, model(x, t, y))
    none, partial = model(x, t, y, stop_after=3)
    assert none is None and set(partial) == {3}
    torch.testing.assert_close(partial[3], hidden[3])
    with pytest.raises(ValueError, match="outside 1..4"):
        model(x, t, y, return_layers=(5,))


def test_null_label_is_the_unconditional_model():
    model = perturbed_dit()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.tensor([10, 10])))


def test_bad_per_token_shape_names_the_expected_shape():
    model = perturbed_dit()
    with pytest.raises(ValueError, match=r"\(B, N\) = \(2, 16\)"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2, 15), None)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = perturbed_dit()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DiT.from_pretrained(tmp_path / "m").eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_loading_weights_of_another_size_names_the_tensor(tmp_path):
    perturbed_dit(hidden_size=64).save_pretrained(tmp_path / "small")
    wide = perturbed_dit(hidden_size=128)
    from selfflow.checkpoint import load_tensors
    from selfflow.model import load_state_strict

    with pytest.raises(CheckpointError, match="has shape .* the model expects"):
        load_state_strict(wide, load_tensors(tmp_path / "small" / "model.safetensors"), tmp_path / "small")


def test_activation_checkpointing_gives_the_same_gradients():
    model = perturbed_dit().train()
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y).pow(2).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, t, y).pow(2).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


# ---- the fast per-token paths equal the reference computations ---------------------------------
def _two_times_per_sample(batch=5, tokens=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, 1, generator=g).expand(batch, tokens).clone()
    t[:, torch.randperm(tokens, generator=g)[: tokens // 4]] = torch.rand(batch, 1, generator=g)
    t[1] = 0.25  # a sample with a single time
    t[2, :3] = torch.tensor([0.9, 0.1, 0.9])  # three distinct times, unsorted, repeated
    return t


def test_distinct_times_equals_torch_unique_of_sample_time_pairs():
    from selfflow.model import distinct_times

    t = _two_times_per_sample()
    B, N = t.shape
    pairs = torch.stack([torch.arange(B)[:, None].expand(B, N).reshape(-1).float(), t.reshape(-1)], dim=1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    times, sample, index = distinct_times(t)
    assert torch.equal(times, unique[:, 1]) and torch.equal(sample, unique[:, 0].long())
    assert torch.equal(index, inverse.view(B, N))
    assert torch.equal(times[index], t) and torch.equal(sample[index], torch.arange(B)[:, None].expand(B, N))


def test_rows_to_tokens_equals_index_then_chunk_values_and_gradients():
    from selfflow.model import rows_to_tokens

    torch.manual_seed(0)
    rows = torch.randn(7, 6 * 8, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 7, (3, 10))
    weights = [torch.randn(3, 10, 8, dtype=torch.float64) for _ in range(6)]
    fast = rows_to_tokens(rows, index, 6)
    reference = rows[index].chunk(6, dim=-1)
    for a, b in zip(fast, reference):
        assert torch.equal(a, b)
    grad_fast, = torch.autograd.grad(sum((w * p).sum() for w, p in zip(weights, fast)), rows)
    grad_ref, = torch.autograd.grad(sum((w * p).sum() for w, p in zip(weights, reference)), rows)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-12, atol=1e-12)
    broadcast = rows_to_tokens(rows, None, 6)
    assert all(p.shape == (7, 1, 8) for p in broadcast)


def test_one_time_per_sample_takes_the_broadcast_path_exactly():
    model = perturbed_dit()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 10, 7])
    per_token = t[:, None].expand(4, model.num_tokens).contiguous()
    cond, index = model._conditioning(per_token, y, 4)
    assert index is None and torch.equal(cond, model._conditioning(t, y, 4)[0])
    assert torch.equal(model(x, per_token, y), model(x, t, y))


def test_deduplicated_gradients_equal_the_full_per_token_computation():
    model = perturbed_dit()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([1, 2, 3, 10, 4])
    t = _two_times_per_sample()
    grads = {}
    for dedupe in (True, False):
        model.zero_grad(set_to_none=True)
        model.dedupe_times = dedupe
        model(x, t, y).pow(2).mean().backward()
        grads[dedupe] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)
