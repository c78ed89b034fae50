"""Tests of cnf.fields: the ConcatSquash layers, the networks and the MLP's analytic trace."""

import pytest
import torch
from torch import nn

from cnf.fields import (
    ACTIVATIONS,
    ConcatSquashConv2d,
    ConcatSquashConvNet,
    ConcatSquashLinear,
    ConcatSquashMLP,
    _make_activation,
    _trace_of_chain,
)
from cnf.trace import divergence_exact

F64 = torch.float64


def _autograd_trace(field, t, z):
    """Trace of the full autograd Jacobian, one sample at a time (the slow reference)."""
    out = []
    for zi in z:
        jac = torch.autograd.functional.jacobian(lambda x: field(t, x[None])[0], zi)
        out.append(jac.reshape(zi.numel(), zi.numel()).trace())
    return torch.stack(out)


def _dense_chain_trace(weights, slopes, gate):
    """tr(diag(g) W_{n+1} S_n W_n ... S_1 W_1) with dense matrices, per sample."""
    out = []
    for b in range(slopes[0].shape[0]):
        jac = torch.diag(slopes[0][b]) @ weights[0]
        for w, s in zip(weights[1:-1], slopes[1:]):
            jac = torch.diag(s[b]) @ w @ jac
        out.append(torch.trace(torch.diag(gate) @ weights[-1] @ jac))
    return torch.stack(out)


class _Divergence(nn.Module):
    """The divergence as a module's output, so functional_call can swap the field's parameters."""

    def __init__(self, field, field_aware):
        super().__init__()
        self.field, self.field_aware = field, field_aware

    def forward(self, t, z):
        return divergence_exact(self.field, t, z, field_aware=self.field_aware)[1]


def _randomize(module, scale=0.8):
    """O(1) weights instead of the default init, so traces and slopes are far from zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
    return module


# ----------------------------------------------------------------------------- layers


def test_concat_squash_linear_formula():
    torch.manual_seed(0)
    layer = ConcatSquashLinear(3, 5).double()
    x, t = torch.randn(4, 3, dtype=F64), torch.tensor(0.7, dtype=F64)
    lin, gate, bias = layer.linear, layer.hyper_gate, layer.hyper_bias
    expected = (x @ lin.weight.T + lin.bias) * torch.sigmoid(
        gate.weight[:, 0] * 0.7 + gate.bias
    ) + bias.weight[:, 0] * 0.7
    torch.testing.assert_close(layer(t, x), expected, rtol=1e-12, atol=1e-12)
    assert layer.hyper_bias.bias is None  # the time shift d t has no constant of its own


def test_concat_squash_conv_formula_and_transpose_shape():
    torch.manual_seed(0)
    layer = ConcatSquashConv2d(2, 3).double()
    x, t = torch.randn(2, 2, 5, 5, dtype=F64), torch.tensor(-0.3, dtype=F64)
    gate = torch.sigmoid(layer.hyper_gate.weight[:, 0] * -0.3 + layer.hyper_gate.bias)
    expected = (
        layer.conv(x) * gate[:, None, None] + (layer.hyper_bias.weight[:, 0] * -0.3)[:, None, None]
    )
    torch.testing.assert_close(layer(t, x), expected, rtol=1e-12, atol=1e-12)
    up = ConcatSquashConv2d(2, 3, kernel_size=4, stride=2, padding=1, transpose=True)
    assert up(0.5, torch.randn(2, 2, 5, 5)).shape == (2, 3, 10, 10)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_shapes_and_dtypes(activation):
    field = ConcatSquashMLP(3, hidden=(8, 8), activation=activation)
    z = torch.randn(5, 3)
    assert field(torch.tensor(0.2), z).shape == (5, 3)
    # a float64 time with a float32 state (the solver may pass one) is cast, not an error
    assert field(torch.tensor(0.2, dtype=F64), z).dtype == torch.float32
    field64 = field.to(F64)
    assert field64(0.2, z.double()).dtype == F64
    assert all(p.dtype == F64 for p in field64.parameters())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_folded_layers_equal_the_layers(activation):
    # the MLP folds each layer's gate and shift into its weights (one affine map per layer);
    # that must be the ConcatSquash equation, evaluated layer by layer
    torch.manual_seed(7)
    field = _randomize(ConcatSquashMLP(3, hidden=(5, 4), activation=activation).to(F64))
    z, t = torch.randn(6, 3, dtype=F64), torch.tensor(0.45, dtype=F64)
    weights, biases = field._affine_maps(t.reshape(1))
    x = z
    for k, layer in enumerate(field.layers):
        torch.testing.assert_close(x @ weights[k] + biases[k], layer(t, x), rtol=1e-12, atol=1e-12)
        x = layer(t, x)
        if k < len(field.activations):
            x = field.activations[k](x)
    torch.testing.assert_close(field(t, z), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(field.forward_with_divergence(t, z)[0], x, rtol=1e-12, atol=1e-12)


def test_conv_net_shapes():
    field = ConcatSquashConvNet(2, hidden_channels=(4, 6), activation="swish")
    z = torch.randn(3, 2, 5, 7)
    assert field(torch.tensor(0.0), z).shape == z.shape
    with pytest.raises(ValueError, match=r"\(batch, 2, H, W\)"):
        field(torch.tensor(0.0), torch.randn(3, 3, 5, 7))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_derivative_matches_autograd(name):
    # including the far tails, where F.softplus switches to the identity above 20 (the kinks
    # themselves, 0 for ELU and 20 for softplus, are left out: derivatives there are a convention)
    act = _make_activation(name).to(F64)
    x = torch.cat([torch.linspace(-30, 30, 240, dtype=F64), torch.tensor([20.5, 21.0, 25.0])])
    x.requires_grad_(True)
    y, dy = act.value_and_derivative(x)
    torch.testing.assert_close(y, act(x), rtol=0, atol=0)
    (dy_auto,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    torch.testing.assert_close(dy, dy_auto, rtol=0, atol=1e-15)
    # the analytic slope must be differentiable like autograd's (the trace is trained through)
    (d2, d2_auto) = (torch.autograd.grad(v.sum(), x)[0] for v in (dy, dy_auto))
    torch.testing.assert_close(d2, d2_auto, rtol=0, atol=1e-14)


def test_every_layer_owns_its_parameters():
    field = ConcatSquashMLP(2, hidden=(4, 4, 4), activation="swish")
    acts = list(field.activations)
    assert len({id(a) for a in acts}) == 3
    betas = [a.beta for a in acts]
    assert len({id(b) for b in betas}) == 3
    # parameters() deduplicates shared tensors: every layer contributes its own five
    # (linear W, b; gate a, c; shift d) and every swish its beta
    assert len(list(field.parameters())) == 4 * 5 + 3
    conv = ConcatSquashConvNet(1, hidden_channels=(2, 2), activation="swish")
    assert len({id(a) for a in conv.activations}) == 2


@pytest.mark.parametrize("cls", [ConcatSquashMLP, ConcatSquashConvNet])
def test_unknown_activation_lists_valid_ones(cls):
    with pytest.raises(ValueError, match="valid activations.*tanh.*softplus.*swish.*elu"):
        cls(2, (4,), activation="relu")


def test_bad_sizes_and_shapes():
    with pytest.raises(ValueError, match="hidden"):
        ConcatSquashMLP(2, hidden=())
    with pytest.raises(ValueError, match="hidden"):
        ConcatSquashMLP(2, hidden=(4, 0))
    with pytest.raises(ValueError, match="dim"):
        ConcatSquashMLP(0)
    field = ConcatSquashMLP(3, hidden=(4,))
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        field(torch.tensor(0.0), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        field.forward_with_divergence(torch.tensor(0.0), torch.randn(5, 3, 1))
    with pytest.raises(ValueError, match="scalar time"):
        field(torch.zeros(2), torch.randn(5, 3))


# ---------------------------------------------------------------- a time per sample


def _row_by_row(field, t, z):
    """The scalar-time path, one sample at a time (the reference for a time per sample)."""
    return torch.cat([field(t[i], z[i : i + 1]) for i in range(z.shape[0])])


@pytest.mark.parametrize("zero_init_last", [False, True])
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda zero: ConcatSquashMLP(3, (5, 4), "swish", zero_init_last=zero), (3,)),
        (lambda zero: ConcatSquashMLP(2, (6, 5, 7), "softplus", zero_init_last=zero), (2,)),
        (lambda zero: ConcatSquashConvNet(2, (3, 4), "elu", zero_init_last=zero), (2, 5, 4)),
    ],
)
def test_a_time_per_sample_equals_scalar_times_row_by_row(make, shape, zero_init_last):
    torch.manual_seed(3)
    field = make(zero_init_last).to(F64)
    if not zero_init_last:
        _randomize(field)
    t, z = torch.rand(7, dtype=F64) * 2 - 0.5, torch.randn(7, *shape, dtype=F64)
    f = field(t, z)
    torch.testing.assert_close(f, _row_by_row(field, t, z), rtol=1e-12, atol=1e-12)
    if zero_init_last:
        assert torch.equal(f, torch.zeros_like(f))
    # the same gradients reach every parameter (and t) as through the row-by-row evaluation
    params = [p for p in field.parameters()]
    t.requires_grad_(True)
    weights = torch.randn_like(f)
    fast = torch.autograd.grad((field(t, z) * weights).sum(), [t, *params])
    slow = torch.autograd.grad((_row_by_row(field, t, z) * weights).sum(), [t, *params])
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layers_take_a_time_per_sample():
    torch.manual_seed(4)
    linear = ConcatSquashLinear(3, 4).to(F64)
    t, x = torch.rand(5, dtype=F64), torch.randn(5, 2, 3, dtype=F64)  # (batch, ..., in)
    expected = torch.stack([linear(t[i], x[i]) for i in range(5)])
    torch.testing.assert_close(linear(t, x), expected, rtol=1e-12, atol=1e-12)
    for transpose in (False, True):
        conv = ConcatSquashConv2d(2, 3, 4, stride=2, transpose=transpose).to(F64)
        x = torch.randn(5, 2, 6, 6, dtype=F64)
        torch.testing.assert_close(conv(t, x), _row_by_row(conv, t, x), rtol=1e-12, atol=1e-12)
    # one element in any shape is a scalar time, as before
    z = torch.randn(4, 3, dtype=F64)
    field = ConcatSquashMLP(3, (4,)).to(F64)
    torch.testing.assert_close(
        field(torch.tensor([0.3], dtype=F64), z), field(0.3, z), rtol=0, atol=0
    )


def test_bad_per_sample_times_are_value_errors():
    mlp, conv = ConcatSquashMLP(3, hidden=(4,)), ConcatSquashConvNet(1, (2,))
    z, img = torch.randn(5, 3), torch.randn(5, 1, 4, 4)
    for bad in (torch.zeros(4), torch.zeros(6), torch.zeros(5, 1), torch.zeros(1, 5)):
        with pytest.raises(ValueError, match=r"one time per sample of shape \(5,\)"):
            mlp(bad, z)
        with pytest.raises(ValueError, match=r"one time per sample of shape \(5,\)"):
            conv(bad, img)
        with pytest.raises(ValueError, match=r"one time per sample of shape \(5,\)"):
            ConcatSquashLinear(3, 2)(bad, z)
    with pytest.raises(ValueError, match="scalar time"):
        ConcatSquashLinear(3, 2)(torch.zeros(3), torch.randn(3))  # a 1-D x has no batch
    with pytest.raises(ValueError, match="forward only"):
        mlp.forward_with_divergence(torch.rand(5), z)


def test_zero_init_last_starts_at_the_zero_field_and_trains():
    field = ConcatSquashMLP(2, hidden=(8, 8), zero_init_last=True)
    z = torch.randn(16, 2)
    f, div = field.forward_with_divergence(torch.tensor(0.4), z)
    assert torch.equal(f, torch.zeros_like(f)) and torch.equal(div, torch.zeros_like(div))
    (f.square().sum() + (f * z).sum()).backward()
    assert field.layers[-1].linear.weight.grad.abs().sum() > 0


def test_fields_move_with_to():
    # .to(dtype) here; .to(device) moves the same registered parameters (no tensors are held
    # outside the module), which the CPU-only test machine cannot exercise
    field = ConcatSquashMLP(2, hidden=(4,), activation="swish").to(F64)
    assert {p.dtype for p in field.parameters()} == {F64}
    assert {b.dtype for b in field.buffers()} <= {F64}


# ---------------------------------------------------------------- analytic divergence


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "dim, hidden",
    [(3, (5,)), (3, (5, 4)), (2, (6, 5, 7)), (12, (4, 5, 3)), (3, (4, 5, 3, 6)), (9, (3, 4, 5, 6))],
)
def test_field_aware_trace_equals_autograd_and_generic(activation, dim, hidden):
    torch.manual_seed(1)
    field = ConcatSquashMLP(dim, hidden=hidden, activation=activation).to(F64)
    _randomize(field)
    z, t = torch.randn(6, dim, dtype=F64), torch.tensor(0.35, dtype=F64)
    f, div = field.forward_with_divergence(t, z)
    torch.testing.assert_close(f, field(t, z), rtol=0, atol=1e-14)
    torch.testing.assert_close(div, _autograd_trace(field, t, z), rtol=0, atol=1e-10)
    _, div_generic = divergence_exact(field, t, z, field_aware=False)
    torch.testing.assert_close(div, div_generic, rtol=0, atol=1e-10)
    assert div.abs().max() > 1e-3  # not a vacuous comparison of zeros


@pytest.mark.parametrize("hidden", [(4,), (4, 5), (4, 5, 6), (4, 5, 6, 3), (3, 4, 5, 6, 7)])
@pytest.mark.parametrize("strategy", ["forward", "cycle"])
def test_trace_of_chain_both_strategies(hidden, strategy):
    torch.manual_seed(2)
    dim = 3
    sizes = (dim, *hidden, dim)
    weights = [torch.randn(b, a, dtype=F64) for a, b in zip(sizes[:-1], sizes[1:])]
    slopes = [torch.randn(5, h, dtype=F64) for h in hidden]
    gate = torch.rand(dim, dtype=F64)
    expected = _dense_chain_trace(weights, slopes, gate)
    # _trace_of_chain takes the transposed weights, with the gate folded in: diag(g) W_{n+1}
    folded = [*weights[:-1], gate[:, None] * weights[-1]]
    got = _trace_of_chain([w.T for w in folded], slopes, strategy)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_trace_strategy_choice_follows_cost():
    # whichever strategy is picked, the value is the same; the point here is that both are
    # reachable from real fields: small D goes forward, large D goes round the cycle
    torch.manual_seed(3)
    for dim in (2, 64):
        field = ConcatSquashMLP(dim, hidden=(8, 8, 8)).to(F64)
        z, t = torch.randn(4, dim, dtype=F64), torch.tensor(0.1, dtype=F64)
        _, div = field.forward_with_divergence(t, z)
        _, ref = divergence_exact(field, t, z, field_aware=False)
        torch.testing.assert_close(div, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("hidden", [(3, 4, 3), (3, 4)])
def test_field_aware_trace_gradients_match_generic_and_gradcheck(hidden):
    torch.manual_seed(4)
    field = _randomize(ConcatSquashMLP(2, hidden=hidden, activation="swish").to(F64))
    z = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.tensor(0.6, dtype=F64)
    params = list(field.parameters())

    def grads(field_aware):
        f, div = divergence_exact(field, t, z, field_aware=field_aware)
        loss = (f.sin().sum() + (div * torch.arange(1.0, 4.0, dtype=F64)).sum()) ** 2
        return torch.autograd.grad(loss, [z, *params])

    for g_fa, g_gen in zip(grads(True), grads(False)):
        torch.testing.assert_close(g_fa, g_gen, rtol=1e-10, atol=1e-12)

    names = [f"field.{name}" for name, _ in field.named_parameters()]

    def div_of(field_aware):
        wrapper = _Divergence(field, field_aware)

        def fn(z, *values):
            return torch.func.functional_call(wrapper, dict(zip(names, values)), (t, z))

        return fn

    inputs = (z, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(div_of(True), inputs)
    assert torch.autograd.gradcheck(div_of(False), inputs)


def test_field_aware_trace_finite_differences_on_parameters():
    torch.manual_seed(5)
    field = _randomize(ConcatSquashMLP(2, hidden=(3, 3, 3), activation="tanh").to(F64))
    z, t = torch.randn(4, 2, dtype=F64), torch.tensor(0.2, dtype=F64)

    def loss():
        return (field.forward_with_divergence(t, z)[1] * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum()

    weight = field.layers[1].linear.weight
    (grad,) = torch.autograd.grad(loss(), weight)
    eps = 1e-6
    for idx in [(0, 0), (1, 2), (2, 1)]:
        with torch.no_grad():
            weight[idx] += eps
            up = loss()
            weight[idx] -= 2 * eps
            down = loss()
            weight[idx] += eps
        assert abs((up - down) / (2 * eps) - grad[idx]) < 1e-6 * grad.abs().max()
    assert grad.abs().max() > 1e-2


def test_conv_net_exact_trace_equals_autograd():
    torch.manual_seed(6)
    field = _randomize(
        ConcatSquashConvNet(2, hidden_channels=(3, 4), activation="elu").to(F64), 0.5
    )
    z, t = torch.randn(2, 2, 3, 3, dtype=F64), torch.tensor(0.5, dtype=F64)
    f, div = divergence_exact(field, t, z)
    assert f.shape == z.shape and div.shape == (2,)
    torch.testing.assert_close(div, _autograd_trace(field, t, z), rtol=0, atol=1e-10)


def test_analytic_trace_builds_no_graph_in_eval():
    field = ConcatSquashMLP(2, hidden=(4, 4, 4))
    with torch.no_grad():
        f, div = field.forward_with_divergence(torch.tensor(0.0), torch.randn(3, 2))
    assert f.grad_fn is None and div.grad_fn is None


def test_module_is_an_nn_module_with_state_dict_round_trip():
    field = ConcatSquashMLP(2, hidden=(4, 4), activation="swish")
    other = ConcatSquashMLP(2, hidden=(4, 4), activation="swish")
    other.load_state_dict(field.state_dict())
    z = torch.randn(3, 2)
    torch.testing.assert_close(other(0.3, z), field(0.3, z))
    assert isinstance(field, nn.Module)


# ------------------------------------------------------------ the solving() context


def test_solving_computes_the_hypernets_once_per_grad_mode_and_agrees():
    torch.manual_seed(3)
    field = _randomize(ConcatSquashMLP(3, hidden=(5, 4), activation="tanh").to(F64))
    z, t = torch.randn(6, 3, dtype=F64), torch.tensor(0.45, dtype=F64)
    params = list(field.parameters())
    plain = field.forward_with_divergence(t, z)
    plain_grads = torch.autograd.grad(plain[0].sum() + plain[1].sum(), params)
    calls = []
    original = torch.cat
    with field.solving():
        torch.cat = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            with torch.no_grad():  # cached without a graph ...
                first = [field.forward_with_divergence(t, z) for _ in range(3)]
            # ... which a call under autograd must not reuse: its gradients reach the weights
            inside = field.forward_with_divergence(t, z)
            again = field.forward_with_divergence(t, z)
        finally:
            torch.cat = original
    assert len(calls) == 2 * 4  # b, a, c, d once per grad mode, not once per call
    for out in (*first, inside, again):
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    grads = torch.autograd.grad(inside[0].sum() + inside[1].sum(), params)
    for g, w in zip(grads, plain_grads):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-15)


def test_solving_forgets_on_exit_and_nests():
    field = ConcatSquashMLP(2, hidden=(4,)).to(F64)
    z, t = torch.randn(3, 2, dtype=F64), 0.3
    with field.solving():
        with field.solving():
            before = field(t, z)
        assert torch.equal(field(t, z), before)  # the outer context still holds the cache
    with torch.no_grad():
        field.layers[0].hyper_gate.bias.add_(1.0)  # a training step, between solves
    assert not torch.allclose(field(t, z), before)
    assert "_hypernet_cache" not in field.__dict__


def test_a_conditional_solve_concatenates_once_per_grad_mode_and_part():
    from cnf import CNF
    from cnf.context import Conditioned, ContextEmbedding

    torch.manual_seed(0)
    field = ConcatSquashMLP(2, hidden=(8, 8), context_features=3).to(F64)
    model = Conditioned(field, ContextEmbedding(inputs=3).to(F64))
    with model.solving():  # the wrapper hands the context on to its field
        assert "_hypernet_cache" in field.__dict__
    flow = CNF(model, (2,), rtol=1e-7, atol=1e-7)
    x, c = torch.randn(5, 2, dtype=F64), torch.randn(5, 3, dtype=F64)
    calls, original = [], torch.cat
    torch.cat = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            out = flow.evaluate(x, context=c)
    finally:
        torch.cat = original
    assert out.nfe > 20
    # per evaluation: [t, c] for the hypernets and the solver's joint state; the parameters'
    # four concatenations happen once for the hidden layers and once for the output layer
    assert len(calls) <= 2 * out.nfe + 2 * 4 + 10
    with torch.no_grad():
        plain = flow.evaluate(x, context=c, adjoint=False)
    torch.testing.assert_close(out.log_prob, plain.log_prob, rtol=0, atol=0)
