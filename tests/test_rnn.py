"""RNN: fused cells == Flax's reference cells, masking ignores padding, stack/bidirectional shapes, heads."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from jaxml.models import rnn


def test_lstm_cell_equals_flax_lstm_cell():
    x_BxC = jax.random.normal(jax.random.key(0), (3, 5))
    ref = nn.LSTMCell(features=4)
    carry = (jax.random.normal(jax.random.key(1), (3, 4)), jax.random.normal(jax.random.key(2), (3, 4)))
    p = ref.init(jax.random.key(3), carry, x_BxC)["params"]
    gates = ("i", "f", "g", "o")
    ours = {"input_kernel": jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], 1),
            "recurrent_kernel": jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], 1),
            "bias": jnp.concatenate([p[f"h{g}"]["bias"] for g in gates])}
    (c1, h1), _ = ref.apply({"params": p}, carry, x_BxC)
    (c2, h2), _ = rnn.LSTMCell(4).apply({"params": ours}, carry, x_BxC)
    np.testing.assert_allclose(c2, c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)


def test_gru_cell_equals_flax_gru_cell():
    x_BxC = jax.random.normal(jax.random.key(0), (3, 5))
    ref = nn.GRUCell(features=4)
    h = jax.random.normal(jax.random.key(1), (3, 4))
    p = ref.init(jax.random.key(3), h, x_BxC)["params"]
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape), p)  # non-zero biases
    gates = ("r", "z", "n")
    ours = {"input_kernel": jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], 1),
            "input_bias": jnp.concatenate([p[f"i{g}"]["bias"] for g in gates]),
            "recurrent_kernel": jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], 1),
            "recurrent_bias_n": p["hn"]["bias"]}
    h1, _ = ref.apply({"params": p}, h, x_BxC)
    h2, _ = rnn.GRUCell(4).apply({"params": ours}, h, x_BxC)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)


def test_classifier_ignores_padding_and_accepts_signals():
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 20)
    lengths = jnp.array([7, 4])
    model = rnn.TinyClassifier(num_classes=3, vocab_size=20, cell="gru")
    variables = jax.jit(model.init)(jax.random.key(1), tokens, lengths)
    apply = jax.jit(model.apply)
    other = tokens.at[1, 4:].set(0)
    np.testing.assert_allclose(apply(variables, tokens, lengths), apply(variables, other, lengths), rtol=1e-5,
                               atol=1e-6)
    signals = rnn.TinyClassifier(num_classes=3, num_layers=2)
    out = jax.eval_shape(lambda: signals.apply(signals.init(jax.random.key(0), jnp.ones((2, 9, 3))), jnp.ones((2, 9, 3))))
    assert out.shape == (2, 3)


def test_char_lm_is_causal_and_shaped():
    model = rnn.TinyLM(vocab_size=30)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 30)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply)
    a, b = apply(variables, tokens), apply(variables, tokens.at[:, 5:].set(1))
    assert a.shape == (2, 9, 30)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])


_KINDS = {"lstm": (rnn.LSTM, rnn.LSTMCell), "gru": (rnn.GRU, rnn.GRUCell)}


class _CellStack(nn.Module):
    """RNNStack in the nn.RNN-over-cell form it had before `rnn.LSTM` / `rnn.GRU`."""
    kind: str
    hidden: int
    num_layers: int
    bidirectional: bool

    @nn.compact
    def __call__(self, x_BxTxC, lengths_B=None):
        cell = _KINDS[self.kind][1]
        for i in range(self.num_layers):
            forward = nn.RNN(cell(self.hidden))
            if self.bidirectional:
                backward = nn.RNN(cell(self.hidden), reverse=True, keep_order=True)
                x_BxTxC = nn.Bidirectional(forward, backward)(x_BxTxC, seq_lengths=lengths_B)
            else:
                x_BxTxC = forward(x_BxTxC, seq_lengths=lengths_B)
        return x_BxTxC


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_stack_keeps_the_cell_forms_parameters_and_function(kind, bidirectional):
    """Same parameter names, shapes and initial values (checkpoints keep loading), same outputs."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 5))
    lengths = jnp.array([6, 2, 4]) if bidirectional else None
    ours, ref = rnn.RNNStack(kind, 4, 2, bidirectional), _CellStack(kind, 4, 2, bidirectional)
    v_ours, v_ref = ours.init(jax.random.key(1), x, lengths), ref.init(jax.random.key(1), x, lengths)
    jax.tree.map(np.testing.assert_array_equal, v_ours, v_ref)
    v_ref = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), v_ref)  # biases != 0
    np.testing.assert_allclose(ours.apply(v_ref, x, lengths), ref.apply(v_ref, x, lengths), rtol=1e-5, atol=1e-6)


def test_rnn_stack_rejects_an_unknown_cell():
    with pytest.raises(ValueError, match="unknown cell 'rnn'; expected 'lstm' or 'gru'"):
        rnn.RNNStack("rnn", 4).init(jax.random.key(0), jnp.ones((2, 3, 5)))


def _layer_and_reference(kind, reverse, row_blocks=1, time_chunks=1):
    x = jax.random.normal(jax.random.key(0), (6, 7, 5))  # batch 6: no per-step array has a kernel's shape
    lengths = jnp.array([7, 3, 5, 6, 2, 7])
    layer_cls, cell_cls = _KINDS[kind]
    layer = layer_cls(4, reverse=reverse, row_blocks=row_blocks, time_chunks=time_chunks)
    params = layer.init(jax.random.key(1), x, lengths)["params"]
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), params)  # biases != 0
    ref = nn.RNN(cell_cls(4), reverse=reverse, keep_order=True)
    f = lambda p, x: layer.apply({"params": p}, x, lengths)
    g = lambda p, x: ref.apply({"params": {"cell": p}}, x, seq_lengths=lengths)
    return f, g, params, x


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse,row_blocks,time_chunks", [(False, 1, 1), (True, 1, 1), (False, 2, 1), (True, 3, 1),
                                                         (False, 1, 3), (True, 2, 2)])
def test_sequence_layer_values_gradients_and_forward_mode_equal_the_scanned_cell(kind, reverse, row_blocks,
                                                                                  time_chunks):
    f, g, params, x = _layer_and_reference(kind, reverse, row_blocks, time_chunks)
    np.testing.assert_allclose(f(params, x), g(params, x), rtol=1e-5, atol=1e-6)
    target = jax.random.normal(jax.random.key(3), (6, 7, 4))
    loss = lambda fn: (lambda p, x: jnp.sum((fn(p, x) - target) ** 2 * jnp.arange(1, 8)[:, None]))
    grads, grads_ref = jax.grad(loss(f), (0, 1))(params, x), jax.grad(loss(g), (0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, grads_ref)
    tangents = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape), (params, x))
    _, jvp = jax.jvp(f, (params, x), tangents)
    _, jvp_ref = jax.jvp(g, (params, x), tangents)
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-4, atol=1e-5)
    # Hessian-vector product: forward mode over reverse mode, through both custom rules.
    hvp = jax.jvp(lambda p: jax.grad(loss(f))(p, x), (params,), (tangents[0],))[1]
    hvp_ref = jax.jvp(lambda p: jax.grad(loss(g))(p, x), (params,), (tangents[0],))[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), hvp, hvp_ref)


def _eqns(jaxpr):
    """Every equation of a jaxpr, those in sub-jaxprs (scan bodies, custom rules) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def _gradient_scans(fn, params, x):
    """(carry shapes, per-step output shapes) of each scan in the jaxpr of fn's gradient, in order."""
    closed = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(fn(p, x) ** 2)))(params)
    found = []
    for eqn in _eqns(closed.jaxpr):
        if eqn.primitive.name == "scan":  # the body's outputs: carries, then per-step outputs
            # (a carry leaves the scan in its own shape, a per-step output stacked)
            shapes = [tuple(v.aval.shape) for v in eqn.params["jaxpr"].jaxpr.outvars]
            carries = sum(tuple(v.aval.shape) == shape for v, shape in zip(eqn.outvars, shapes))
            found.append((shapes[:carries], shapes[carries:]))
    return found


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_weight_gradients_are_not_accumulated_inside_the_time_loop(kind):
    """The kernel gradients are one matmul after the loop: no scan of the backward pass returns
    a (C, gH) or (H, gH) array (the nn.RNN form carries both through its loop, adding per step)."""
    f, g, params, x = _layer_and_reference(kind, False)
    weight_shapes = {tuple(a.shape) for a in jax.tree.leaves(params) if a.ndim == 2}
    gates = {"lstm": 4, "gru": 3}[kind]
    assert weight_shapes == {(5, gates * 4), (4, gates * 4)}

    ours, ref = ([shape for carries, ys in _gradient_scans(fn, params, x) for shape in carries + ys] for fn in (f, g))
    assert ours and not weight_shapes & set(ours), ours
    assert weight_shapes <= set(ref), ref  # the check sees what it looks for


@pytest.mark.parametrize("kind,saved", [("lstm", [(6, 4), (6, 16), (6, 4)]), ("gru", [(6, 4), (6, 8), (6, 4), (6, 4)])])
def test_the_forward_loop_saves_activations_and_the_tangent_factors_are_computed_after_it(kind, saved):
    """Per step, the gradient's forward time loop saves the hidden state and the activations
    (LSTM: h, i f g o, c; GRU: h, r z, h W_hn + b_hn, n), not the tangent step's six factors:
    those are computed after the loop for all steps at once, which keeps the loop's ops few
    (7 per-step arrays when they were computed in it); the backward loop is the second scan."""
    f, _, params, x = _layer_and_reference(kind, False)
    (forward_carries, forward_saved), (backward_carries, _) = _gradient_scans(f, params, x)
    assert forward_saved == saved
    assert forward_carries == backward_carries == [(6, 4)] * len(forward_carries)


def test_gate_activations_are_sigmoid_and_tanh_to_float32_precision():
    """One op for the four gates' activations (sigmoid through tanh): within 3e-7 of float64
    sigmoid on the i, f, o lanes and tanh on the g lanes, over and beyond the range they saturate
    in (XLA's own float32 tanh is off by up to 2.3e-7, its sigmoid by 0.9e-7)."""
    x = np.linspace(-40, 40, 8 * 4000, dtype=np.float32).reshape(8, 4 * 1000)
    act = np.asarray(jax.jit(rnn._lstm_activations)(x), np.float64).reshape(8, 4, 1000)
    x64 = x.astype(np.float64).reshape(8, 4, 1000)
    expected = 1 / (1 + np.exp(-x64))
    expected[:, 2] = np.tanh(x64[:, 2])
    np.testing.assert_allclose(act, expected, rtol=0, atol=3e-7)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_sequence_layer_in_bfloat16_keeps_float32_state_and_tracks_float32(kind):
    x = jax.random.normal(jax.random.key(0), (2, 6, 5))
    layer_cls = _KINDS[kind][0]
    layer32, layer16 = layer_cls(8), layer_cls(8, dtype=jnp.bfloat16)
    params = layer32.init(jax.random.key(1), x)["params"]
    y32, y16 = layer32.apply({"params": params}, x), layer16.apply({"params": params}, x)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=0.05)
    g16 = jax.grad(lambda p: jnp.sum(layer16.apply({"params": p}, x) ** 2))(params)
    g32 = jax.grad(lambda p: jnp.sum(layer32.apply({"params": p}, x) ** 2))(params)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=0.1 * float(jnp.max(jnp.abs(b))))


def test_scans_name_the_shapes_they_expected_and_got():
    w_h, xg, h = jnp.zeros((4, 16)), jnp.zeros((7, 3, 16)), jnp.zeros((3, 4))
    assert rnn.lstm_scan(w_h, xg, h, h)[0].shape == (7, 3, 4)
    with pytest.raises(ValueError, match=r"lstm_scan expects .* \(time, batch, 4H\).* got kernel \(4, 16\), "
                                         r"inputs \(3, 16\), states \(3, 4\), \(3, 4\)"):
        rnn.lstm_scan(w_h, xg[0], h, h)
    w_h3, xg3 = jnp.zeros((4, 12)), jnp.zeros((7, 3, 12))
    assert rnn.gru_scan(w_h3, jnp.zeros(4), xg3, h).shape == (7, 3, 4)
    with pytest.raises(ValueError, match=r"gru_scan expects .* states \(batch, H\); got .* states \(2, 4\)"):
        rnn.gru_scan(w_h3, jnp.zeros(4), xg3, h[:2])
    with pytest.raises(ValueError, match=r"recurrent_bias_n \(4,\), got \(3,\)"):
        rnn.gru_scan(w_h3, jnp.zeros(3), xg3, h)


def _forward_loop_dots(layer, batch):
    """dot_generals in the body of the forward time loop of `layer` over a (batch, 5, 3) input."""
    x = jnp.ones((batch, 5, 3))
    params = layer.init(jax.random.key(0), x)["params"]
    jaxpr = jax.make_jaxpr(lambda p: layer.apply({"params": p}, x))(params).jaxpr
    scans = [eqn.params["jaxpr"].jaxpr for eqn in _eqns(jaxpr) if eqn.primitive.name == "scan"]
    assert len(scans) == 1, scans
    return sum(eqn.primitive.name == "dot_general" for eqn in scans[0].eqns)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_row_blocks_default_to_two_on_cpu_where_they_measured_faster(kind):
    """On CPU with two or more cores, even batches of 2-32 at 192-384 hidden units run the forward
    loop as two row blocks (two matmuls per step), other sizes as one; an explicit count applies
    where it divides the batch."""
    layer_cls = _KINDS[kind][0]
    assert jax.default_backend() == "cpu"
    two = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    assert _forward_loop_dots(layer_cls(256), 32) == two
    assert _forward_loop_dots(layer_cls(256), 2) == two
    assert _forward_loop_dots(layer_cls(256), 64) == 1
    assert _forward_loop_dots(layer_cls(256), 31) == 1
    assert _forward_loop_dots(layer_cls(128), 32) == 1
    assert _forward_loop_dots(layer_cls(512), 8) == 1
    assert _forward_loop_dots(layer_cls(256, row_blocks=1), 32) == 1
    assert _forward_loop_dots(layer_cls(4, row_blocks=4), 64) == 4
    assert _forward_loop_dots(rnn.RNNStack(kind, 4, row_blocks=3), 6) == 3  # RNNStack passes it on
    assert _forward_loop_dots(layer_cls(4, row_blocks=4), 6) == 1  # a batch it does not divide: one block


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_time_chunks_run_consecutive_pieces_of_the_sequence(kind):
    """`time_chunks` runs the time axis as that many consecutive pieces (lengths differing by at most
    one), each its own time loop; None is 4 on CPU with two or more cores for 16 steps or more at
    batches of 16 or more, else 1."""
    layer_cls = _KINDS[kind][0]

    def loop_lengths(layer, steps, batch=4):
        x = jnp.ones((batch, steps, 3))
        params = layer.init(jax.random.key(0), x)["params"]
        jaxpr = jax.make_jaxpr(lambda p: layer.apply({"params": p}, x))(params).jaxpr
        return [eqn.params["length"] for eqn in _eqns(jaxpr) if eqn.primitive.name == "scan"]

    assert loop_lengths(layer_cls(4, time_chunks=3), 7) == [2, 3, 2]
    assert loop_lengths(layer_cls(4, time_chunks=1), 64) == [64]
    assert loop_lengths(layer_cls(4, time_chunks=9), 5) == [1] * 5  # at most one piece per step
    assert loop_lengths(rnn.RNNStack(kind, 4, num_layers=2, time_chunks=2), 6) == [3, 3, 3, 3]  # passed on
    assert jax.default_backend() == "cpu"
    cores = len(os.sched_getaffinity(0))
    assert loop_lengths(layer_cls(4), 64, batch=16) == ([16] * 4 if cores >= 2 else [64])
    assert loop_lengths(layer_cls(4), 17, batch=32) == ([4, 4, 5, 4] if cores >= 2 else [17])
    assert loop_lengths(layer_cls(4), 15, batch=16) == [15]
    assert loop_lengths(layer_cls(4), 64, batch=8) == [64]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"{layer_cls.__name__}: time_chunks must be None or a positive "
                                             rf"integer, got {bad}"):
            loop_lengths(layer_cls(4, time_chunks=bad), 7)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_time_chunks_input_gradient_is_one_concatenate_of_the_pieces(kind):
    """In reverse mode the pieces' input gradients are joined by one concatenate, not padded to the
    whole sequence and added (a slice per piece transposes so), which would make the layer below
    wait for every piece's gradient before its own backward loop could start."""
    layer = _KINDS[kind][0](4, time_major=True, time_chunks=2)
    x_TxBxC = jax.random.normal(jax.random.key(0), (8, 6, 5))
    params = layer.init(jax.random.key(1), x_TxBxC)["params"]
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(layer.apply({"params": params}, x) ** 2)))(x_TxBxC).jaxpr
    whole = [eqn.primitive.name for eqn in _eqns(jaxpr) if any(tuple(v.aval.shape) == x_TxBxC.shape
                                                                 for v in eqn.outvars)]
    assert "concatenate" in whole and "pad" not in whole, whole


def test_row_blocks_must_be_a_positive_count():
    w_h, xg, h = jnp.zeros((4, 16)), jnp.zeros((7, 6, 16)), jnp.zeros((6, 4))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"lstm_scan: row_blocks must be None or a positive integer, "
                                             rf"got {bad}"):
            rnn.lstm_scan(w_h, xg, h, h, row_blocks=bad)
    with pytest.raises(ValueError, match=r"gru_scan: row_blocks must be None or a positive integer, got 0"):
        rnn.gru_scan(jnp.zeros((4, 12)), jnp.zeros(4), jnp.zeros((7, 6, 12)), h, row_blocks=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_row_blocks_keep_a_data_sharded_batch_on_its_devices(kind):
    """Row blocks interleave rows, so a batch sharded over devices in contiguous chunks moves no row
    between devices (no all-gather, all-to-all or permute in the step), and the gradients are
    those of the unsharded layer."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = 2 * jax.device_count()
    x = jax.random.normal(jax.random.key(0), (batch, 6, 3))
    layer = _KINDS[kind][0](8, row_blocks=2)
    params = layer.init(jax.random.key(1), x)["params"]
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x) ** 2), (0, 1)))
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    hlo = grad.lower(params, sharded).compile().as_text()
    moved = [op for op in ("all-gather", "all-to-all", "collective-permute") if op in hlo]
    assert not moved, moved
    expected = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x) ** 2), (0, 1)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad(params, sharded), expected)
