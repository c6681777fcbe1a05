"""Static-shape conditioning and torch.compile: the same numbers as the data-dependent path, and a
training step that traces into one graph with no recompiles across changing masks."""
import pytest
import torch

from selfflow.model import TimeRows
from support import perturbed_dit


def dual_times(batch: int, tokens: int, seed: int = 0, ratio: float = 0.25) -> TimeRows:
    """Self-Flow's K = 2 rows: (t, s) per sample and a mask picking s for a quarter of the tokens."""
    g = torch.Generator().manual_seed(seed)
    times = torch.rand(batch, 2, generator=g)
    return TimeRows(times, (torch.rand(batch, tokens, generator=g) < ratio).long())


def test_time_rows_give_the_numbers_of_the_distinct_times_path():
    model = perturbed_dit()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 10, 7])
    rows = dual_times(4, model.num_tokens)
    static = model(x, rows, y)
    dynamic = model(x, rows.per_token(), y)
    assert torch.equal(static, dynamic)


def test_time_rows_with_one_row_per_sample_equal_the_per_sample_path():
    model = perturbed_dit()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    rows = TimeRows(t[:, None], torch.zeros(3, model.num_tokens, dtype=torch.long))
    assert torch.equal(model(x, rows, y), model(x, t, y))


def test_time_rows_with_layer_capture_and_stop_after():
    model = perturbed_dit(depth=4)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([5, 1, 10, 2])
    rows = dual_times(4, model.num_tokens, seed=1, ratio=0.5)
    out_s, hid_s = model(x, rows, y, return_layers=(1, 3))
    out_d, hid_d = model(x, rows.per_token(), y, return_layers=(1, 3))
    assert torch.equal(out_s, out_d) and all(torch.equal(hid_s[k], hid_d[k]) for k in (1, 3))
    none_s, stopped_s = model(x, rows, y, stop_after=2)
    none_d, stopped_d = model(x, rows.per_token(), y, stop_after=2)
    assert none_s is None and none_d is None and torch.equal(stopped_s[2], stopped_d[2])


def test_time_rows_gradients_equal_the_distinct_times_path():
    """Backward sums each row's gradient over its tokens in another order: equal to rounding."""
    grads = []
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 10, 7])
    rows = dual_times(4, 16, seed=2)
    for t in (rows, rows.per_token()):
        model = perturbed_dit()
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bad_time_rows_shape_names_both_shapes():
    model = perturbed_dit()
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        model(torch.randn(4, 1, 8, 8), TimeRows(torch.rand(4, 2), torch.zeros(4, 15, dtype=torch.long)))
