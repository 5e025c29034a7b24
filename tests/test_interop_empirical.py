"""Empirical NTK / NNGP: every implementation against a direct ``jax.jacobian`` NTK.

Models are tiny (seconds per case) and cover Flax linen (MLP, CNN, ResNet block with
BatchNorm statistics carried), NNX, Haiku (with and without state) and plain
``f(params, x)`` functions, including parameter uses the structured interpreter must
hand to its generic path (weight sharing, ``lax.scan``, ``custom_vjp``).
"""

from __future__ import annotations

import functools
import string

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from interop_helpers import (
  f64,
  fast_jit,
  perturb,
  x64_fast_compile,  # noqa: F401  (autouse fixture)
)

import interop
from interop import adapters, autoselect

IMPLS = ["jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto"]
AXES = [((-1,), ()), ((), ()), ((), (0,)), ((0,), ()), ((), (-1,))]


# ----------------------------------------------------------------------------- reference


def full_ntk(f, params, x1, *others):
  """Direct definition: ``sum_p J(x1) J(x)^T`` for each ``x`` in ``others``, from
  ``jax.jacobian`` over flattened parameters; shape ``f(x1).shape + f(x).shape``."""
  @fast_jit
  def run(params, x1, others):
    j1 = jax.jacobian(lambda p: f(p, x1))(params)
    out_nd = jax.eval_shape(lambda p: f(p, x1), params).ndim
    fulls = []
    for x in others:
      j2 = jax.jacobian(lambda p, x=x: f(p, x))(params)
      full = 0.0
      for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2)):
        a = a.reshape(a.shape[:out_nd] + (-1,))
        b = b.reshape(b.shape[:out_nd] + (-1,))
        full = full + jnp.tensordot(a, b, axes=([out_nd], [out_nd]))
      fulls.append(full)
    return fulls
  out = [np.asarray(a) for a in run(params, x1, others)]
  return tuple(out) if len(out) > 1 else out[0]


def reference_ntk(f, params, x1, x2, trace_axes, diagonal_axes):
  full = full_ntk(f, params, x1, x2)
  return trace_diag(full, full.ndim // 2, trace_axes, diagonal_axes)


def trace_diag(full, nd, trace_axes, diagonal_axes):
  trace = [a % nd for a in ((trace_axes,) if isinstance(trace_axes, int) else trace_axes)]
  diag = [a % nd for a in ((diagonal_axes,) if isinstance(diagonal_axes, int)
                           else diagonal_axes)]
  letters = iter(string.ascii_letters)
  lhs1, lhs2, out = [], [], []
  size = 1
  for i in range(nd):
    a = next(letters)
    if i in trace:
      lhs1.append(a)
      lhs2.append(a)
      size *= full.shape[i]
    elif i in diag:
      lhs1.append(a)
      lhs2.append(a)
      out.append(a)
    else:
      b = next(letters)
      lhs1.append(a)
      lhs2.append(b)
      out += [a, b]
  spec = "".join(lhs1 + lhs2) + "->" + "".join(out)
  return np.einsum(spec, full) / size


def reference_nngp(f, params, x1, x2, trace_axes, diagonal_axes):
  o1, o2 = np.asarray(f(params, x1)), np.asarray(f(params, x2))
  return trace_diag(np.multiply.outer(o1, o2), o1.ndim, trace_axes, diagonal_axes)


# ----------------------------------------------------------------------------- models


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    x = nn.LayerNorm()(x)
    x = nn.gelu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class FlaxCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), strides=(2, 1), padding="SAME")(x))
    x = jnp.tanh(nn.Conv(4, (2, 2), padding="VALID", kernel_dilation=(1, 2))(x))
    x = nn.avg_pool(x, (2, 2), padding="SAME")
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class FlaxResNetBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train)(x)
    h = nn.Conv(4, (3, 3))(nn.relu(h))
    h = nn.BatchNorm(use_running_average=not train)(h)
    x = nn.relu(x + h)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, rngs=rngs)
    self.bn = nnx.BatchNorm(5, use_running_average=True, rngs=rngs)
    self.l2 = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.softplus(self.bn(self.l1(x))))


def _haiku_mlp(x):
  return hk.nets.MLP([5, 3], activation=jnp.tanh)(x)


def _haiku_bn(x, is_training=False):
  h = hk.Linear(5)(x)
  h = hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)
  return hk.Linear(3)(jax.nn.relu(h))


def _plain_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w": jax.random.normal(k1, (4, 5)), "u": jax.random.normal(k2, (5, 6)),
          "b": jax.random.normal(k3, (6,)), "s": jnp.array(0.7)}


def plain_shared(p, x):
  """Weight sharing (``w`` used twice) and a 3D output ``(N, 2, 3)``."""
  h = jnp.tanh(x @ p["w"])
  h = jnp.sin(h @ p["w"].T @ p["w"]) * p["s"]
  y = h @ p["u"] + 2.0 * p["b"]
  return y.reshape(x.shape[0], 2, 3)


def plain_scan(p, x):
  """A parameter used inside ``lax.scan`` (opaque to the structured interpreter)."""
  def step(h, _):
    return jnp.tanh(h @ p["w"][:, :4] + h), None
  h, _ = jax.lax.scan(step, x, None, length=3)
  return h @ p["u"][:4] + p["b"]


@jax.custom_vjp
def _scaled(w, x):
  return x @ w


def _scaled_fwd(w, x):
  return x @ w, (w, x)


def _scaled_bwd(res, g):
  w, x = res
  return (x.T @ g, g @ w.T)


_scaled.defvjp(_scaled_fwd, _scaled_bwd)


def plain_custom_vjp(p, x):
  return jnp.tanh(_scaled(p["w"], x)) @ p["u"] + p["b"] * p["s"]


def _flax_case(module, shape, key):
  x = jax.random.normal(key, shape)
  # jit: eager Flax init would compile every primitive separately (slow first call)
  variables = fast_jit(lambda k: f64(perturb(module.init(k, x), jax.random.PRNGKey(2))))(
      jax.random.PRNGKey(1))
  f, params = adapters.adapt(module).bind(variables)
  return module, variables, f, params


@functools.cache
def make_case(name):
  """Returns ``(model, variables, f_ref(params, x), params, input shape)``."""
  key = jax.random.PRNGKey(0)
  if name == "flax_mlp":
    m, v, f, p = _flax_case(FlaxMLP(), (3, 4), key)
    return m, v, f, p, (4,)
  if name == "flax_cnn":
    m, v, f, p = _flax_case(FlaxCNN(), (2, 6, 5, 2), key)
    return m, v, f, p, (6, 5, 2)
  if name == "flax_resnet_bn":
    m, v, f, p = _flax_case(FlaxResNetBN(), (2, 5, 5, 2), key)
    assert "batch_stats" in v
    return m, v, f, p, (5, 5, 2)
  if name == "nnx":
    model = NNXModel(nnx.Rngs(0))
    state = f64(perturb(nnx.state(model), jax.random.PRNGKey(2)))
    f, params = adapters.adapt(model).bind(state)
    return model, state, f, params, (4,)
  if name == "haiku":
    t = hk.transform(_haiku_mlp)
    params = fast_jit(lambda k: f64(perturb(t.init(k, jnp.ones((2, 4))),
                                            jax.random.PRNGKey(2))))(key)
    return t, params, lambda p, x: t.apply(p, None, x), params, (4,)
  if name == "haiku_state":
    t = hk.transform_with_state(_haiku_bn)

    @fast_jit
    def init(k):
      params, state = t.init(k, jnp.ones((2, 4)), is_training=True)
      params = f64(perturb(params, jax.random.PRNGKey(2)))
      state = f64(perturb(state, jax.random.PRNGKey(3), 0.1))
      return params, jax.tree_util.tree_map(jnp.abs, state)  # valid variances

    params, state = init(key)
    return t, (params, state), lambda p, x: t.apply(p, state, None, x)[0], params, (4,)
  if name in ("plain_shared", "plain_scan", "plain_custom_vjp"):
    f = {"plain_shared": plain_shared, "plain_scan": plain_scan,
         "plain_custom_vjp": plain_custom_vjp}[name]
    params = f64(_plain_params(key))
    return f, params, f, params, (4,)
  raise ValueError(name)


CASES = ["flax_mlp", "flax_cnn", "flax_resnet_bn", "nnx", "haiku", "haiku_state",
         "plain_shared", "plain_scan", "plain_custom_vjp"]


def _inputs(shape, n1=3, n2=2):
  x1 = jax.random.normal(jax.random.PRNGKey(10), (n1,) + shape, jnp.float64)
  x2 = jax.random.normal(jax.random.PRNGKey(11), (n2,) + shape, jnp.float64)
  return x1, x2


# ----------------------------------------------------------------------------- tests


#: (vmap_axes, trace_axes, diagonal_axes) settings checked for every model.
SETTINGS = [(None, (-1,), ()), (None, (), (0,)), (0, (), ()), (0, (0,), ()), (0, (), (-1,)),
            ("auto", (-1,), ()), ("auto", (), ())]


@functools.cache
def _reference(case):
  """Full NTKs ``(x1, x2)`` and ``(x1, x1)`` of shape ``out1 + out2``, one compile."""
  _, _, f_ref, params, shape = make_case(case)
  x1, x2 = _inputs(shape)
  return full_ntk(f_ref, params, x1, x2, x1)


def _check_settings(case, implementation, settings):
  """Checks several settings in one compiled function (XLA shares the Jacobian work)."""
  model, variables, *_, shape = make_case(case)
  x1, x2 = _inputs(shape)
  full_12, full_11 = _reference(case)
  nd = full_12.ndim // 2
  checks = []
  for vmap_axes, trace_axes, diagonal_axes in settings:
    if case == "plain_shared" and trace_axes == (-1,):
      trace_axes = (1, 2)  # a multi-axis trace on the 3D output
    same = 0 in diagonal_axes or 0 in trace_axes
    expected = trace_diag(full_11 if same else full_12, nd, trace_axes, diagonal_axes)
    ntk_fn = interop.empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes,
                                      implementation)
    checks.append((ntk_fn, same, expected, (trace_axes, diagonal_axes, vmap_axes)))

  @fast_jit
  def run(x1, x2, variables):
    return [fn(x1, None if same else x2, variables) for fn, same, *_ in checks]

  for got, (_, _, expected, setting) in zip(run(x1, x2, variables), checks):
    assert got.shape == expected.shape, setting
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(),
                               err_msg=f"{case} {implementation} {setting}")


@pytest.mark.parametrize("implementation", IMPLS[:3])
@pytest.mark.parametrize("case", CASES)
def test_ntk_matches_jacobian(case, implementation):
  # Three of the five settings per (model, implementation), rotating so that every
  # implementation meets every setting and every model meets several.
  i = CASES.index(case) + IMPLS.index(implementation)
  _check_settings(case, implementation, [SETTINGS[(i + j) % len(SETTINGS)] for j in range(3)])


@pytest.mark.parametrize("case", ["flax_resnet_bn", "nnx", "haiku_state"])
def test_auto_matches_jacobian(case):
  i = CASES.index(case)
  _check_settings(case, "auto", [SETTINGS[i % len(SETTINGS)]])


@pytest.mark.parametrize("case", ["flax_mlp", "haiku_state", "plain_shared"])
def test_nngp_and_kernel_fn(case):
  model, variables, f_ref, params, shape = make_case(case)
  x1, x2 = _inputs(shape)
  for trace_axes, diagonal_axes in AXES[:3]:
    same = 0 in diagonal_axes
    expected = reference_nngp(f_ref, params, x1, x1 if same else x2, trace_axes,
                              diagonal_axes)
    got = interop.empirical_nngp_fn(model, trace_axes, diagonal_axes)(
        x1, None if same else x2, variables)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
  kernel_fn = interop.empirical_kernel_fn(model, implementation=3)
  both = kernel_fn(x1, x2, None, variables)
  assert both._fields == ("nngp", "ntk")
  full = _reference(case)[0]
  np.testing.assert_allclose(both.ntk, trace_diag(full, full.ndim // 2, (-1,), ()), rtol=1e-8)
  np.testing.assert_allclose(kernel_fn(x1, x2, "nngp", variables), both.nngp)
  flipped = kernel_fn(x1, x2, ("ntk", "nngp"), variables)
  assert flipped._fields == ("ntk", "nngp")
  np.testing.assert_allclose(flipped.ntk, both.ntk)


def test_float32_all_implementations():
  with jax.enable_x64(False):
    module = FlaxCNN()
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 5, 2))
    v = fast_jit(module.init)(jax.random.PRNGKey(1), x1)
    f, params = adapters.adapt(module).bind(v)
    expected = reference_ntk(f, params, x1, x1, (-1,), ())
    fns = [interop.empirical_ntk_fn(module, vmap_axes=0, implementation=i) for i in (1, 2, 3)]
    outs = fast_jit(lambda x, v: [fn(x, None, v) for fn in fns])(x1, v)
    outs.append(interop.empirical_ntk_fn(module, vmap_axes=0)(x1, None, v))  # auto
    for got in outs:
      assert got.dtype == jnp.float32
      np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("implementation", ["structured_derivatives", "auto"])
def test_jit_compatible(implementation):
  model, variables, *_, shape = make_case("nnx")
  x1, x2 = _inputs(shape)
  ntk_fn = interop.empirical_ntk_fn(model, (), (), 0, implementation)
  eager = ntk_fn(x1, x2, variables)
  jitted = fast_jit(ntk_fn)(x1, x2, variables)
  np.testing.assert_allclose(jitted, eager, rtol=1e-10)
  np.testing.assert_allclose(eager, trace_diag(_reference("nnx")[0], 2, (), ()), rtol=1e-8)


class FlaxBNTrain(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(5)(x))
    return nn.Dense(2)(jnp.tanh(h))


def _bn_case():
  model = FlaxBNTrain()
  x1, x2 = _inputs((4,))
  variables = fast_jit(lambda k: f64(perturb(model.init(k, x1), jax.random.PRNGKey(2))))(
      jax.random.PRNGKey(1))
  return model, variables, x1, x2


def test_flax_train_mode_batch_statistics():
  """BatchNorm with batch statistics mixes examples: needs vmap_axes=None, still exact."""
  model, variables, x1, x2 = _bn_case()
  rest = {k: v for k, v in variables.items() if k != "params"}

  def f(p, x):
    return model.apply({**rest, "params": p}, x, train=True, mutable=["batch_stats"])[0]

  expected = reference_ntk(f, variables["params"], x1, x2, (), ())
  fns = [interop.empirical_ntk_fn(model, (), (), None, impl) for impl in (1, 2, 3)]
  # the default vmap_axes="auto" must see the batch statistics and not vmap
  fns.append(interop.empirical_ntk_fn(model, (), (), implementation=3))
  outs = fast_jit(lambda a, b, v: [fn(a, b, v, train=True, mutable=["batch_stats"])
                                      for fn in fns])(x1, x2, variables)
  for got in outs:
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_bound_apply_differentiates_params_only():
  """``module.apply`` and the module itself: only ``params`` are differentiated."""
  model, variables, x1, x2 = _bn_case()
  rest = {k: v for k, v in variables.items() if k != "params"}
  expected = reference_ntk(lambda p, x: model.apply({**rest, "params": p}, x),
                           variables["params"], x1, x2, (-1,), ())
  got = interop.empirical_ntk_fn(model.apply, implementation=3)(x1, x2, variables)
  np.testing.assert_allclose(got, expected, rtol=1e-8)
  # NT semantics for a plain function: every leaf, batch_stats included, is a parameter
  nt_style = interop.empirical_ntk_fn(lambda v, x: model.apply(v, x), implementation=3)
  everything = reference_ntk(lambda v, x: model.apply(v, x), variables, x1, x2, (-1,), ())
  np.testing.assert_allclose(nt_style(x1, x2, variables), everything, rtol=1e-8)
  assert not np.allclose(everything, expected)


def test_pytree_outputs_and_kwargs():
  def f(p, x, scale=1.0):
    h = jnp.tanh(x @ p["w"])
    return {"a": h @ p["u"] * scale, "b": (h ** 2) @ p["u"][:, :2]}

  params = f64(_plain_params(jax.random.PRNGKey(0)))
  x1, x2 = _inputs((4,))
  fns = [interop.empirical_ntk_fn(f, (), (), 0, impl) for impl in (1, 2, 3)]
  outs = fast_jit(lambda a, b, p, s: [fn(a, b, p, scale=s) for fn in fns])(x1, x2, params, 0.5)
  for name in ("a", "b"):
    expected = reference_ntk(lambda p, x, n=name: f(p, x, 0.5)[n], params, x1, x2, (), ())
    for got in outs:
      np.testing.assert_allclose(got[name], expected, rtol=1e-8, atol=1e-12)


def test_haiku_rng_is_split_between_inputs():
  def net(x):
    return hk.dropout(hk.next_rng_key(), 0.5, hk.Linear(3)(x))

  t = hk.transform(net)
  x1, x2 = _inputs((4,))
  params = f64(t.init(jax.random.PRNGKey(0), x1))
  rng = jax.random.PRNGKey(5)
  same = interop.empirical_ntk_fn(t, implementation=3)(x1, None, params, rng=rng)
  expected = reference_ntk(lambda p, x: t.apply(p, rng, x), params, x1, x1, (-1,), ())
  np.testing.assert_allclose(same, expected, rtol=1e-10)
  got = interop.empirical_ntk_fn(t, implementation=1)(x1, x2, params, rng=rng)
  assert got.shape == (3, 2)


def test_structure_report_and_generic_fallback():
  model, variables, *_ , shape = make_case("flax_cnn")
  report = interop.structure_report(model, jnp.ones((2,) + shape), variables, vmap_axes=0)
  assert not report["generic"] and len(report["structured"]) == 6
  assert report["batch"] == ["vmap_axes given: input axes [0]"]
  report = interop.structure_report(plain_shared, jnp.ones((2, 4)),
                                    _plain_params(jax.random.PRNGKey(0)))
  assert report["generic"] == ["['w']"]
  assert report["batch"][0].startswith("examples are independent: vmap over input axis 0")
  report = interop.structure_report(plain_custom_vjp, jnp.ones((2, 4)),
                                    _plain_params(jax.random.PRNGKey(0)))
  assert "['w']" in report["generic"] and "['u']: dot_general" in report["structured"]
  # custom_vjp: its backward rule is opaque, so independence is not proven
  assert report["batch"][0].startswith("examples may interact, exact non-vmapped path")


#: Whether vmap_axes="auto" proves examples independent for each model of CASES.
INDEPENDENT = {"flax_mlp": True, "flax_cnn": True, "flax_resnet_bn": True, "nnx": True,
               "haiku": True, "haiku_state": True, "plain_shared": True,
               "plain_scan": False,  # loops are not analysed
               "plain_custom_vjp": False}  # no forward mode to analyse


@pytest.mark.parametrize("case", CASES)
def test_batch_independence_found(case):
  from interop.batch_independence import detect_batch_independence
  _, _, f_ref, params, shape = make_case(case)
  found = detect_batch_independence(f_ref, params, jnp.ones((3,) + shape), {})
  assert found.independent == INDEPENDENT[case], found.reason
  if found.independent:
    assert found.x_axis == 0 and jax.tree_util.tree_leaves(found.fx_axis) == [0]


def _linear(p, x):
  return x @ p


@pytest.mark.parametrize("f, reason", [
    (lambda p, x: _linear(p, x) - _linear(p, x).mean(0), "reduces over the batch axis"),
    (lambda p, x: jnp.roll(_linear(p, x), 1, axis=0), "slices the batch axis"),
    (lambda p, x: _linear(p, x) * jnp.arange(x.shape[0])[:, None], "without reading"),
    (lambda p, x: _linear(p, x) * (2.0 if x.shape[0] == 1 else 1.0), "batch size"),
    (lambda p, x: _linear(p, x) / x.shape[0], "batch size"),
    (lambda p, x: _linear(p, x) @ _linear(p, x).T, "both operands batched"),
    (lambda p, x: jax.nn.softmax(_linear(p, x), axis=0), "reduces over the batch axis"),
    (lambda p, x: jnp.cumsum(_linear(p, x), axis=0), "batch axis"),
    (lambda p, x: _linear(p, x).reshape(-1), "merges the batch axis"),
    (lambda p, x: jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (x.shape[0], 2))
     * _linear(p, x), "without reading"),
])
def test_batch_coupling_is_detected(f, reason):
  """Every way of mixing examples keeps the exact non-vmapped path, with a reason."""
  from interop.batch_independence import detect_batch_independence
  found = detect_batch_independence(f, jnp.ones((3, 2)), jnp.ones((4, 3)), {})
  assert not found.independent and reason in found.reason, found.reason


def test_batch_axis_not_first_in_output():
  """An output with the batch on axis 1 is found and vmapped there; kernel exact."""
  def f(p, x):
    h = jnp.tanh(x @ p["w"])
    return jnp.stack([h @ p["u"], jnp.sin(h) @ p["u"]]).transpose(2, 1, 0)  # (6, N, 2)

  from interop.batch_independence import detect_batch_independence
  params = f64(_plain_params(jax.random.PRNGKey(0)))
  x1, x2 = _inputs((4,))
  found = detect_batch_independence(f, params, x1, {})
  assert found.independent and found.fx_axis == 1
  expected = reference_ntk(f, params, x1, x2, (0,), ())
  fns = [interop.empirical_ntk_fn(f, (0,), (), implementation=i) for i in (1, 3)]
  for got in fast_jit(lambda a, b, p: [fn(a, b, p) for fn in fns])(x1, x2, params):
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_auto_picks_a_candidate_and_caches():
  model, variables, _f_ref, _params, shape = make_case("flax_mlp")
  x1, x2 = _inputs(shape)
  ntk_fn = interop.empirical_ntk_fn(model, vmap_axes=0)
  assert isinstance(ntk_fn, autoselect._AutoNtk)
  first = ntk_fn(x1, x2, variables)
  assert len(ntk_fn.cache) == 1
  assert len(ntk_fn.last_estimates) + len(ntk_fn.last_pruned) == 3
  assert all(e.flops > 0 for e in ntk_fn.last_estimates)
  np.testing.assert_allclose(ntk_fn(x1, x2, variables), first)
  assert len(ntk_fn.cache) == 1
  assert ntk_fn.choose(x1, x2, variables, {}) in set(interop.NtkImplementation)


def test_auto_prunes_before_compiling():
  """Bounds from the lowered HLO drop hopeless candidates without compiling them: the
  full NTK of a 64-wide MLP costs Jacobian contraction ``(N O)^2 P`` FLOPs, far above
  structured derivatives' upper bound, so Jacobian contraction is never compiled."""
  class WideMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(10)(x)

  model = WideMLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
  variables = f64(fast_jit(model.init)(jax.random.PRNGKey(1), x))
  ntk_fn = interop.empirical_ntk_fn(model, (), (), 0)
  got = ntk_fn(x, None, variables)
  impl = interop.NtkImplementation
  assert impl.JACOBIAN_CONTRACTION in ntk_fn.last_pruned
  assert impl.JACOBIAN_CONTRACTION not in [e.implementation for e in ntk_fn.last_estimates]
  assert ntk_fn.choose(x, None, variables, {}) == impl.STRUCTURED_DERIVATIVES
  expected = interop.empirical_ntk_fn(model, (), (), 0, "jacobian_contraction")(
      x, None, variables)
  np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


def test_worth_compiling_bounds():
  b = autoselect.Bounds
  cands = [b("a", None, 1.0, 2.0), b("b", None, 8.0, 9.0), b("c", None, 8.5, 20.0)]
  assert autoselect.PRUNE_WITHIN == 4.0
  assert [c.implementation for c in autoselect.worth_compiling(cands)] == ["a", "b"]


def test_implementation_spellings():
  model, variables, _f_ref, _params, shape = make_case("haiku")
  x1, _ = _inputs(shape)
  expected = trace_diag(_reference("haiku")[1], 2, (-1,), ())
  spellings = ["JACOBIAN_CONTRACTION", 2, "ntk-vector-products",
               interop.NtkImplementation.STRUCTURED_DERIVATIVES]
  fns = [interop.empirical_ntk_fn(model, implementation=i) for i in spellings]
  for got in fast_jit(lambda x, v: [fn(x, None, v) for fn in fns])(x1, variables):
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_ntk_vp_fn():
  model, variables, _f_ref, _params, shape = make_case("flax_mlp")
  x1, x2 = _inputs(shape)
  v = jax.random.normal(jax.random.PRNGKey(3), (2, 3), jnp.float64)
  full = _reference("flax_mlp")[0]  # (N1, K, N2, K)
  expected = np.einsum("ikjl,jl->ik", full, v)
  got = fast_jit(interop.empirical_ntk_vp_fn(model, x1, x2, variables))(v)
  np.testing.assert_allclose(got, expected, rtol=1e-8)


@pytest.mark.parametrize("kwargs, match", [
    ({"trace_axes": (5,)}, "out of range"),
    ({"trace_axes": (0, 0)}, "repeats"),
    ({"trace_axes": (-1,), "diagonal_axes": (-1,)}, "both traced and diagonal"),
    ({"trace_axes": "x"}, "must contain ints"),
    ({"implementation": "fastest"}, "Unknown NTK implementation"),
    ({"implementation": 7}, "Unknown NTK implementation"),
])
def test_bad_arguments(kwargs, match):
  model, variables, *_, shape = make_case("haiku")
  x1, _ = _inputs(shape)
  with pytest.raises((ValueError, TypeError), match=match):
    interop.empirical_ntk_fn(model, **kwargs)(x1, None, variables)


def test_mismatched_shapes():
  model, variables, *_, shape = make_case("haiku")
  x1, x2 = _inputs(shape, 3, 2)
  with pytest.raises(ValueError, match="diagonal_axes"):
    interop.empirical_ntk_fn(model, (), (0,), implementation=1)(x1, x2, variables)
  with pytest.raises(ValueError, match="same pytree structure"):
    interop.empirical_ntk_fn(model, implementation=1)(x1, (x2, x2), variables)
  with pytest.raises(ValueError, match="get"):
    interop.empirical_kernel_fn(model)(x1, x2, "cov", variables)
  with pytest.raises(TypeError, match="variables dict"):
    interop.empirical_ntk_fn(FlaxMLP(), implementation=1)(x1, None, [1.0])
  with pytest.raises(TypeError, match=r"\(params, state\)"):
    interop.empirical_ntk_fn(hk.transform_with_state(_haiku_bn))(x1, None, {"a": 1})
