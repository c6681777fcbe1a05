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


# --------------------------------------------------------------------------------------------
# the step under torch.compile: one graph, no recompiles
# --------------------------------------------------------------------------------------------
class TinyEncoder(torch.nn.Module):
    """A frozen conv 'encoder' (B, 1, 8, 8) → (B, 8, 4, 4) for REPA."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)

    def forward(self, images):
        return self.conv(images)


def build_method(name: str, model):
    from selfflow.methods.flow_matching import FlowMatching, FlowMatchingConfig
    from selfflow.methods.repa import Repa, RepaConfig
    from selfflow.methods.self_flow import SelfFlow, SelfFlowConfig

    if name == "flow_matching":
        return FlowMatching(FlowMatchingConfig(), model)
    if name == "repa":
        return Repa(RepaConfig(student_layer=1), model, encoder=TinyEncoder())
    if name == "reflow":
        from selfflow.methods.reflow import Reflow, ReflowConfig

        return Reflow(ReflowConfig(), model)
    if name == "distill":
        from selfflow.methods.distill import Distill, DistillConfig

        return Distill(DistillConfig(steps=2, loss="pseudo_huber"), model)
    config = {"self_flow": SelfFlowConfig(mask_ratio=0.25), "dual_timestep_only": SelfFlowConfig(mask_ratio=0.25, rep_weight=0.0),
              "single_timestep": SelfFlowConfig(mask_ratio=0.0), "bernoulli": SelfFlowConfig(mask_ratio=0.3, mask_mode="bernoulli")}[name]
    method = SelfFlow(config, model)
    method.bind_teacher(perturbed_dit(depth=model.depth, scale=0.04).requires_grad_(False))
    return method


def make_batch(step: int, size: int = 4):
    from selfflow.methods import Batch, BatchRandom

    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.rand(size, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(size, 1, 8, 8, generator=g)  # a reflow pair's stored ε (the other methods draw their own)
    return Batch(x0=x0, y=torch.randint(0, 10, (size,), generator=g), random=BatchRandom(g, size, slice(0, size)), noise=noise, step=step)


SLOW = pytest.mark.slow
METHODS = ["flow_matching", "self_flow", "repa", "single_timestep", "distill", pytest.param("reflow", marks=SLOW),
           pytest.param("dual_timestep_only", marks=SLOW), pytest.param("bernoulli", marks=SLOW)]


@pytest.mark.parametrize("name", METHODS)
def test_the_step_after_its_draws_is_one_graph(name):
    """torch._dynamo.explain counts graph breaks of the whole loss computation: the student's forward,
    the teacher's (stop_after) or the encoder's, and the losses."""
    model = perturbed_dit(depth=2).train()
    method = build_method(name, model)
    assert method.splits_step
    batch = make_batch(0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(method.compute)(model, batch.x0, method.draw(model, batch))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["self_flow", pytest.param("flow_matching", marks=SLOW), pytest.param("repa", marks=SLOW)])
def test_compiled_step_equals_eager_and_never_recompiles_across_masks(name):
    """The split step compiled whole (fullgraph, autograd traced ahead of time) gives the eager loss and
    gradients, and after the first step new masks, times and labels reuse the same graph."""
    from selfflow.methods.base import Objective

    torch._dynamo.reset()
    model = perturbed_dit(depth=2).train()
    method = build_method(name, model)
    compiled = Objective(model, method, torch.compile(method.compute, fullgraph=True, backend="aot_eager"))
    eager = Objective(model, method)

    def step(number: int) -> None:
        results = []
        for objective in (compiled, eager):
            model.zero_grad(set_to_none=True)
            loss, _ = objective(make_batch(number))
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        for n in results[0][1]:
            torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-4, atol=1e-6, msg=n)

    step(0)  # warm-up: the one compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for number in range(1, 4):
            step(number)


def test_the_distinct_times_path_breaks_the_graph():
    """What the static path removes (and what the break count above would see): (B, N) times go
    through distinct_times, whose shapes depend on the data."""
    model = perturbed_dit(depth=2)
    rows = dual_times(4, model.num_tokens)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 1, 8, 8), rows.per_token(), torch.tensor([0, 1, 2, 3]))
    assert explanation.graph_break_count > 0


@SLOW
def test_trainer_with_compile_on_trains_the_eager_numbers(tiny_config, tmp_path, monkeypatch):
    """train.compile=true: the trainer compiles Self-Flow's compute whole (fullgraph) and its steps give
    the eager run's losses. (Inductor's C++ build takes minutes on a shared CPU: the same graph goes
    through torch.compile with the aot_eager backend here; the Inductor run is benchmarks/compile.py.)"""
    from selfflow.trainer import Trainer

    calls = []
    real_compile = torch.compile

    def compile_aot_eager(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, backend="aot_eager", fullgraph=kwargs.get("fullgraph", False))

    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(torch, "compile", compile_aot_eager)
        method = {"name": "self_flow", "mask_ratio": 0.25, "rep_weight": 0.5}
        trainer = Trainer(tiny_config(tmp_path / str(compiled), method=method, train={"compile": compiled, "steps": 3}))
        try:
            losses[compiled] = [trainer.train_step()["loss"] for _ in range(3)]
        finally:
            trainer.close()
    assert calls == [{"fullgraph": True, "mode": None}]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_self_flow_on_a_two_part_layout_is_one_graph():
    """Audio-video tokens, each part masked with its own ratio: still K = 2 rows per sample, one graph."""
    import copy

    from selfflow.config import SelfFlowConfig
    from selfflow.methods import Batch, BatchRandom
    from selfflow.methods.self_flow import SelfFlow
    from test_modalities import token_model

    model = token_model("audio_video").train()
    method = SelfFlow(SelfFlowConfig(video_mask_ratio=0.25, audio_mask_ratio=0.5), model)
    method.bind_teacher(copy.deepcopy(model).eval().requires_grad_(False))
    x0 = torch.randn(4, *model.sample_shape)
    batch = Batch(x0=x0, y=torch.zeros(4, dtype=torch.long), random=BatchRandom(torch.Generator().manual_seed(0), 4, slice(0, 4)))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(method.compute)(model, x0, method.draw(model, batch))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
