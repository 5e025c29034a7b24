"""Tests of `infinite_modules.predict` against independent float64 NumPy/SciPy computations.

Witnesses: direct `numpy.linalg.solve` posteriors, `scipy.linalg.expm` of the (augmented)
linear ODE for finite times, discrete gradient descent of linear models, `scipy.integrate`
for non-MSE losses. Every check runs in float32 and float64.
"""

from __future__ import annotations

import collections
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
from jax import flatten_util

from infinite_modules import predict

# ---------------------------------------------------------------------------------------------
# Fixtures and helpers.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Runs the test with jax_enable_x64 matching the dtype, restored afterwards."""
    with jax.enable_x64(request.param == "float64"):
        yield np.dtype(request.param)


def tol(dtype, f32=2e-3, f64=1e-9):
    return {"rtol": f32, "atol": f32} if dtype == np.float32 else {"rtol": f64, "atol": f64}


def rel_close(actual, desired, dtype, f32=2e-3, f64=1e-9):
    """Max-abs error relative to the scale of `desired` (robust to tiny entries)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    err = np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-30)
    assert err < (f32 if dtype == np.float32 else f64), err


KernelPair = collections.namedtuple("KernelPair", "nngp ntk")


def relu_kernels(x1, x2, w_var=1.0, b_var=0.1, xp=np):
    """Exact NNGP and NTK of a 1-hidden-layer ReLU network (arc-cosine kernel).

    float64 NumPy by default (the reference); `xp=jnp` for the traceable `kernel_fn`.
    """
    if xp is np:
        x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    d = x1.shape[-1]
    k12 = w_var * x1 @ x2.T / d + b_var
    k11 = w_var * xp.sum(x1 * x1, -1) / d + b_var
    k22 = w_var * xp.sum(x2 * x2, -1) / d + b_var
    norm = xp.sqrt(xp.outer(k11, k22))
    cos = xp.clip(k12 / norm, -1, 1)
    theta = xp.arccos(cos)
    nngp = w_var / (2 * np.pi) * norm * (xp.sin(theta) + (np.pi - theta) * cos) + b_var
    ntk = nngp + k12 * w_var * (np.pi - theta) / (2 * np.pi)
    return nngp, ntk


_relu_kernels_jit = jax.jit(functools.partial(relu_kernels, xp=jnp))


class _KernelObject:
    def __init__(self, nngp, ntk):
        self.nngp, self.ntk = nngp, ntk


def relu_kernel_fn(x1, x2=None, get=None):
    """A `kernel_fn` obeying the `im.kernel_fn` contract, for the ensemble tests."""
    x1 = jnp.asarray(x1)
    x2 = x1 if x2 is None else jnp.asarray(x2)
    nngp, ntk = _relu_kernels_jit(x1, x2)
    values = {"nngp": nngp, "ntk": ntk}
    if get is None:
        return _KernelObject(**values)
    if isinstance(get, str):
        return values[get]
    return collections.namedtuple("Kernel", get)(*(values[g] for g in get))


def make_data(seed, n=8, m=5, d=3, k=2):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)), rng.normal(size=(m, d)), rng.normal(size=(n, k)),
            rng.normal(size=(n, k)), rng.normal(size=(m, k)))


# Reference layout for kernels with output axes, written independently of the module:
# kernels are built from explicit features so the flattened matrices are known exactly.
CASES = {
    # name: (y shape (without batch), trace_axes)
    "traced_last": ((2,), (-1,)),
    "full_outputs": ((2,), ()),
    "scalar_targets": ((), ()),
    "spatial_traced_last": ((3, 2), (-1,)),
    "traced_middle": ((2, 3), (1,)),
}


def feature_problem(case, seed, n=6, m=4):
    """Features phi[i, *non_traced, p]; kernel = phi phi^T interleaved; y with trace axes."""
    y_rest, trace_axes = CASES[case]
    rng = np.random.default_rng(seed)
    y_shape = (n,) + y_rest
    ndim = len(y_shape)
    t_axes = sorted(a % ndim for a in trace_axes)
    nt_rest = tuple(s for i, s in enumerate(y_shape) if i not in t_axes and i != 0)
    rows = n * math.prod(nt_rest)
    p = rows + 4
    phi = rng.normal(size=(n,) + nt_rest + (p,)) / np.sqrt(p)
    phi_t = rng.normal(size=(m,) + nt_rest + (p,)) / np.sqrt(p)

    def kern(a, b):
        k = np.tensordot(a, b, (-1, -1))  # (a..., b...) -> interleave
        h = k.ndim // 2
        order = [j for i in range(h) for j in (i, h + i)]
        return np.transpose(k, order)

    y = rng.normal(size=y_shape)
    f0 = rng.normal(size=y_shape)
    ft0 = rng.normal(size=(m,) + y_shape[1:])

    def to2(arr):  # (batch, ...) y-like -> (rows, traced)
        moved = np.moveaxis(arr, t_axes, list(range(-len(t_axes), 0)))
        return moved.reshape(-1, math.prod(arr.shape[a] for a in t_axes))

    def from2(mat, batch):
        shape = [batch] + [arr for i, arr in enumerate(y_shape) if i != 0 and i not in t_axes]
        tshape = [y_shape[a] for a in t_axes]
        moved = mat.reshape(shape + tshape)
        return np.moveaxis(moved, list(range(-len(t_axes), 0)), t_axes)

    mats = {"dd": phi.reshape(rows, p) @ phi.reshape(rows, p).T,
                "td": phi_t.reshape(-1, p) @ phi.reshape(rows, p).T,
                "tt": phi_t.reshape(-1, p) @ phi_t.reshape(-1, p).T}
    kernels = {"dd": kern(phi, phi), "td": kern(phi_t, phi), "tt": kern(phi_t, phi_t)}
    return {"y": y, "f0": f0, "ft0": ft0, "trace_axes": trace_axes, "mats": mats, "kernels": kernels,
                "to2": to2, "from2": from2, "m": m}


def cast(x, dtype):
    return jnp.asarray(np.asarray(x), dtype)


# ---------------------------------------------------------------------------------------------
# gp_inference.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("get", ["nngp", "ntk", "ntkgp"])
@pytest.mark.parametrize("diag_reg,absolute", [(0.0, False), (0.1, False), (0.05, True)])
def test_gp_inference_matches_direct_solve(dtype, get, diag_reg, absolute):
    x, xt, y, _, _ = make_data(0)
    nngp_dd, ntk_dd = relu_kernels(x, x)
    nngp_td, ntk_td = relu_kernels(xt, x)
    nngp_tt, ntk_tt = relu_kernels(xt, xt)

    def reg(k):
        lam = diag_reg if absolute else diag_reg * np.trace(k) / k.shape[0]
        return k + lam * np.eye(k.shape[0])

    if get == "nngp":
        mean = nngp_td @ np.linalg.solve(reg(nngp_dd), y)
        cov = nngp_tt - nngp_td @ np.linalg.solve(reg(nngp_dd), nngp_td.T)
    elif get == "ntkgp":
        mean = ntk_td @ np.linalg.solve(reg(ntk_dd), y)
        cov = ntk_tt - ntk_td @ np.linalg.solve(reg(ntk_dd), ntk_td.T)
    else:  # linear map of the Gaussian initial outputs, Sigma = M Cov M^T
        a = ntk_td @ np.linalg.inv(reg(ntk_dd))
        mean = a @ y
        cov = nngp_tt - a @ nngp_td.T - nngp_td @ a.T + a @ nngp_dd @ a.T

    c = lambda k: cast(k, dtype)
    predict_fn = predict.gp_inference(KernelPair(c(nngp_dd), c(ntk_dd)), c(y), diag_reg,
                                      absolute)
    out = predict_fn(get, KernelPair(c(nngp_td), c(ntk_td)), KernelPair(c(nngp_tt), c(ntk_tt)))
    assert isinstance(out, predict.Gaussian)
    assert out.mean.dtype == dtype and out.covariance.dtype == dtype
    rel_close(out.mean, mean, dtype)
    rel_close(out.covariance, cov, dtype)
    only_mean = predict_fn(get, KernelPair(c(nngp_td), c(ntk_td)))
    rel_close(only_mean, mean, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_gp_inference_output_axes_and_trace_axes(dtype, case):
    pb = feature_problem(case, 1)
    mats, to2, from2 = pb["mats"], pb["to2"], pb["from2"]
    mean = from2(mats["td"] @ np.linalg.solve(mats["dd"], to2(pb["y"])), pb["m"])
    cov2 = mats["tt"] - mats["td"] @ np.linalg.solve(mats["dd"], mats["td"].T)
    predict_fn = predict.gp_inference(cast(pb["kernels"]["dd"], dtype), cast(pb["y"], dtype),
                                      trace_axes=pb["trace_axes"])
    out = predict_fn("nngp", cast(pb["kernels"]["td"], dtype), cast(pb["kernels"]["tt"], dtype))
    assert out.mean.shape == mean.shape
    assert out.covariance.shape == pb["kernels"]["tt"].shape
    rel_close(out.mean, mean, dtype, f32=5e-3)
    k_tt = pb["kernels"]["tt"]
    h = k_tt.ndim // 2
    cov = np.transpose(cov2.reshape(k_tt.shape[::2] * 2),
                       [j for i in range(h) for j in (i, h + i)])
    rel_close(out.covariance, cov, dtype, f32=5e-3)


def test_gp_inference_get_forms_and_train_set(dtype):
    x, xt, y, _, _ = make_data(2)
    kdd, ktd, ktt = (relu_kernel_fn(cast(a, dtype), None if b is None else cast(b, dtype),
                                    ("nngp", "ntk"))
                     for a, b in [(x, None), (xt, x), (xt, None)])
    predict_fn = predict.gp_inference(kdd, cast(y, dtype))
    both = predict_fn(None, ktd)
    assert type(both).__name__ == "Gaussians" and both._fields == ("nngp", "ntk")
    pair = predict_fn(("ntk", "NNGP"), ktd, ktt)
    assert pair._fields == ("ntk", "nngp")
    np.testing.assert_allclose(pair.ntk.mean, both.ntk, **tol(dtype))
    train = predict_fn("ntk", None, True)
    np.testing.assert_array_equal(train.mean, np.asarray(y, dtype))
    np.testing.assert_array_equal(train.covariance, np.zeros((8, 8)))
    # a `Kernel`-like object (get=None contract) works as well as a namedtuple
    obj = relu_kernel_fn(cast(x, dtype))
    np.testing.assert_allclose(predict.gp_inference(obj, cast(y, dtype))("nngp", ktd),
                               both.nngp, **tol(dtype))


# ---------------------------------------------------------------------------------------------
# gradient_descent_mse.
# ---------------------------------------------------------------------------------------------


def expm_reference(pb, t, lr, diag_reg=0.0):
    """[r; g](t) = expm(t M)[r0; g0] for dr/dt = -a K r, dg/dt = -a K_td r: no inverse."""
    mats, to2, from2 = pb["mats"], pb["to2"], pb["from2"]
    y2, f02, ft02 = to2(pb["y"]), to2(pb["f0"]), to2(pb["ft0"])
    kdd = mats["dd"] + diag_reg * np.trace(mats["dd"]) / mats["dd"].shape[0] * np.eye(
        mats["dd"].shape[0])
    p, q = kdd.shape[0], mats["td"].shape[0]
    a = lr / pb["y"].size
    big = np.zeros((p + q, p + q))
    big[:p, :p] = -a * kdd
    big[p:, :p] = -a * mats["td"]
    out_train, out_test = [], []
    for ti in np.ravel(t):
        state = scipy.linalg.expm(ti * big) @ np.concatenate([f02 - y2, ft02])
        out_train.append(from2(state[:p] + y2, pb["y"].shape[0]))
        out_test.append(from2(state[p:], pb["m"]))
    shape = np.shape(t)
    return (np.stack(out_train).reshape(shape + pb["y"].shape),
            np.stack(out_test).reshape(shape + out_test[0].shape))


@pytest.mark.parametrize("case", ["traced_last", "full_outputs", "traced_middle"])
def test_gradient_descent_mse_matches_expm(dtype, case):
    pb = feature_problem(case, 3)
    t = [[1.0, 7.0], [0.0, 25.0]]  # any shape; scalars are covered below
    lr = 2.0
    want_train, want_test = expm_reference(pb, t, lr)
    predict_fn = predict.gradient_descent_mse(cast(pb["kernels"]["dd"], dtype),
                                              cast(pb["y"], dtype), lr,
                                              trace_axes=pb["trace_axes"])
    fx_train, fx_test = predict_fn(t, cast(pb["f0"], dtype), cast(pb["ft0"], dtype),
                                   cast(pb["kernels"]["td"], dtype))
    assert fx_train.dtype == dtype
    rel_close(fx_train, want_train, dtype)
    rel_close(fx_test, want_test, dtype)
    # a train-only call agrees with the joint one
    rel_close(predict_fn(t, cast(pb["f0"], dtype)), want_train, dtype)


def test_gradient_descent_mse_regularized_and_defaults(dtype):
    pb = feature_problem("traced_last", 4)
    c = lambda a: cast(a, dtype)
    want_train, want_test = expm_reference(pb, 5.0, 1.0, diag_reg=0.3)
    predict_fn = predict.gradient_descent_mse(c(pb["kernels"]["dd"]), c(pb["y"]), diag_reg=0.3)
    fx_train, fx_test = predict_fn(5.0, c(pb["f0"]), c(pb["ft0"]), c(pb["kernels"]["td"]))
    rel_close(fx_train, want_train, dtype)
    rel_close(fx_test, want_test, dtype)
    # fx_train_0=None: training outputs start at 0 and only test outputs are returned
    pb0 = dict(pb, f0=np.zeros_like(pb["f0"]))
    _, want0 = expm_reference(pb0, 5.0, 1.0, diag_reg=0.3)
    rel_close(predict_fn(5.0, None, c(pb["ft0"]), c(pb["kernels"]["td"])), want0, dtype)


@pytest.mark.parametrize("case", ["full_outputs", "spatial_traced_last"])
def test_infinite_time_limits_agree(dtype, case):
    pb = feature_problem(case, 5)
    c = lambda a: cast(a, dtype)
    kdd, ktd, y = c(pb["kernels"]["dd"]), c(pb["kernels"]["td"]), c(pb["y"])
    lr = 0.5
    lam_min = np.linalg.eigvalsh(pb["mats"]["dd"])[0]
    t_big = 40 * pb["y"].size / (lr * lam_min)
    predict_fn = predict.gradient_descent_mse(kdd, y, lr, trace_axes=pb["trace_axes"])
    zeros_test = jnp.zeros((pb["m"],) + pb["y"].shape[1:], dtype)
    inf_train, inf_test = predict_fn(None, 0.0, zeros_test, ktd)
    big_train, big_test = predict_fn(t_big, 0.0, zeros_test, ktd)
    gp_mean = predict.gp_inference(kdd, y, trace_axes=pb["trace_axes"])("ntk", ktd)
    np.testing.assert_array_equal(inf_train, np.asarray(pb["y"], dtype))
    f32 = 2e-2 if dtype == np.float32 else None  # cond(K) ~ 1e3 amplifies float32 round-off
    rel_close(big_train, pb["y"], dtype, f32=f32 or 2e-3, f64=1e-7)
    rel_close(big_test, inf_test, dtype, f32=f32 or 2e-3, f64=1e-7)
    rel_close(inf_test, gp_mean, dtype, f32=1e-5, f64=1e-12)
    want = pb["from2"](pb["mats"]["td"] @ np.linalg.solve(pb["mats"]["dd"],
                                                         pb["to2"](pb["y"])), pb["m"])
    rel_close(inf_test, want, dtype, f32=f32 or 2e-3, f64=1e-8)


def linear_model(seed, n=10, m=4, k=2, p=30, mix_outputs=False):
    """f(x) = phi(x) . w, an exactly linear model: its NTK and GD are known in closed form.

    Returns a dict of float64 NumPy pieces: features, `w0`, `y`, `apply(w, phi)`, `grad(w)` of
    0.5 * mean((f - y)^2), and the NTKs `k_dd`, `k_td`. With `mix_outputs` each output has its own features (full (n, n, k, k) NTK); otherwise
    f = phi @ W with an (n, n) NTK shared by the outputs (Theta (x) I).
    """
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, k))
    if mix_outputs:
        phi, phi_t = rng.normal(size=(n, k, p)), rng.normal(size=(m, k, p))
        w0 = rng.normal(size=(p,))

        def apply(w, ph):
            return np.einsum("nkp,p->nk", ph, w)

        def grad(w):
            return np.einsum("nkp,nk->p", phi, apply(w, phi) - y) / y.size

        def ntk(a, b):
            return np.einsum("iap,jbp->ijab", a, b)
    else:
        phi, phi_t = rng.normal(size=(n, p)), rng.normal(size=(m, p))
        w0 = rng.normal(size=(p, k))

        def apply(w, ph):
            return ph @ w

        def grad(w):
            return phi.T @ (apply(w, phi) - y) / y.size

        def ntk(a, b):
            return a @ b.T

    return {"phi": phi, "phi_t": phi_t, "w0": w0, "y": y, "apply": apply, "grad": grad,
                "k_dd": ntk(phi, phi), "k_td": ntk(phi_t, phi)}


def run_gd(model, lr, steps):
    w = model["w0"]
    for _ in range(steps):
        w = w - lr * model["grad"](w)
    return w


@pytest.mark.parametrize("mix_outputs", [False, True])
def test_discrete_gradient_descent_of_linear_model(dtype, mix_outputs):
    model = linear_model(6, mix_outputs=mix_outputs)
    apply, phi, phi_t, w0, y = (model[k] for k in ("apply", "phi", "phi_t", "w0", "y"))
    trace_axes = () if mix_outputs else (-1,)
    c = lambda a: cast(a, dtype)
    lam_max = np.linalg.eigvalsh(model["k_dd"].reshape(y.size, y.size) if mix_outputs
                                 else model["k_dd"])[-1]
    lr = 0.05 * 2 * y.size / lam_max  # 5% of the maximal stable learning rate
    steps = 300
    w_t = run_gd(model, lr, steps)
    predict_fn = predict.gradient_descent_mse(c(model["k_dd"]), c(y), lr, trace_axes=trace_axes)
    fx_train, fx_test = predict_fn(float(steps), c(apply(w0, phi)), c(apply(w0, phi_t)),
                                   c(model["k_td"]))
    # discretisation error is O(lr * lambda / |y|) relative to the change of the outputs
    for got, want, start in [(fx_train, apply(w_t, phi), apply(w0, phi)),
                             (fx_test, apply(w_t, phi_t), apply(w0, phi_t))]:
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want - start))
        assert err < 0.03, err
    # ... and it shrinks ~linearly with the learning rate at fixed lr * steps
    w_t2 = run_gd(model, lr / 10, steps * 10)
    fx_train2, _ = predict.gradient_descent_mse(c(model["k_dd"]), c(y), lr / 10,
                                                trace_axes=trace_axes)(
        float(steps * 10), c(apply(w0, phi)), c(apply(w0, phi_t)), c(model["k_td"]))
    err1 = np.max(np.abs(np.asarray(fx_train, np.float64) - apply(w_t, phi)))
    err2 = np.max(np.abs(np.asarray(fx_train2, np.float64) - apply(w_t2, phi)))
    assert err2 < err1 / 5 or err2 < (1e-4 if dtype == np.float32 else 1e-12), (err1, err2)


def test_max_learning_rate(dtype):
    model = linear_model(7)
    k_dd, y = model["k_dd"], model["y"]
    lr_max = predict.max_learning_rate(cast(k_dd, dtype), y.size)
    lam = np.linalg.eigvalsh(k_dd)[-1]
    np.testing.assert_allclose(lr_max, 2 * y.size / lam, rtol=1e-5)
    np.testing.assert_allclose(predict.max_learning_rate(cast(k_dd, dtype), y.size, 0.5),
                               3 * y.size / lam, rtol=1e-5)
    np.testing.assert_allclose(predict.max_learning_rate(cast(k_dd, dtype)), 2 * 10 / lam,
                               rtol=1e-5)

    def final_loss(lr):
        w = run_gd(model, lr, 400)
        return 0.5 * np.mean((model["apply"](w, model["phi"]) - y) ** 2)

    initial = final_loss(0.0)
    assert final_loss(0.98 * float(lr_max)) < initial
    assert final_loss(1.05 * float(lr_max)) > 1e3 * initial


# ---------------------------------------------------------------------------------------------
# gradient_descent (ODE).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "case"), [("float32", "full_outputs"),
                                             ("float64", "traced_last")], indirect=["dtype"])
def test_gradient_descent_ode_with_mse_matches_closed_form(dtype, case):
    pb = feature_problem(case, 8)
    c = lambda a: cast(a, dtype)
    kdd, ktd, y = c(pb["kernels"]["dd"]), c(pb["kernels"]["td"]), c(pb["y"])
    mse = lambda fx, y_hat: 0.5 * jnp.mean((fx - y_hat) ** 2)
    t = np.array([[3.0, 0.0], [30.0, 1.0]])  # unsorted, with t=0, any shape
    args = (c(pb["f0"]), c(pb["ft0"]), ktd)
    got = predict.gradient_descent(mse, kdd, y, 2.0, trace_axes=pb["trace_axes"])(t, *args)
    want = predict.gradient_descent_mse(kdd, y, 2.0, trace_axes=pb["trace_axes"])(t, *args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        rel_close(g, w, dtype, f32=1e-4, f64=1e-7)


@pytest.mark.parametrize("dtype", ["float64"], indirect=True)
def test_gradient_descent_momentum_matches_expm_and_discrete(dtype):
    pb = feature_problem("traced_last", 9)
    c = lambda a: cast(a, dtype)
    kdd, y = c(pb["kernels"]["dd"]), c(pb["y"])
    lr, m, steps = 0.2, 0.9, 300.0
    mse = lambda fx, y_hat: 0.5 * jnp.mean((fx - y_hat) ** 2)
    predict_fn = predict.gradient_descent(mse, kdd, y, lr, momentum=m)
    state = predict_fn(steps, predict.ODEState(c(pb["f0"])))
    assert isinstance(state, predict.ODEState) and state.qx_train is not None
    # exact: d/dtau [r; q] = [[0, I], [-K/|y|, (m-1)/sqrt(lr) I]] [r; q], tau = sqrt(lr) t
    kmat, n = pb["mats"]["dd"], pb["mats"]["dd"].shape[0]
    big = np.block([[np.zeros((n, n)), np.eye(n)],
                    [-kmat / pb["y"].size, (m - 1) / np.sqrt(lr) * np.eye(n)]])
    r0 = np.concatenate([pb["f0"] - pb["y"], np.zeros_like(pb["y"])])
    r_t = scipy.linalg.expm(big * np.sqrt(lr) * steps) @ r0
    rel_close(state.fx_train, r_t[:n] + pb["y"], dtype, f32=1e-4, f64=1e-7)
    # heavy-ball discrete updates v <- m v - lr K grad, f <- f + v
    f, v = np.array(pb["f0"]), np.zeros_like(pb["f0"])
    for _ in range(int(steps)):
        v = m * v - lr * kmat @ (f - pb["y"]) / pb["y"].size
        f = f + v
    rel_close(state.fx_train, f, dtype, f32=1e-3, f64=1e-3)


@pytest.mark.parametrize("dtype", ["float64"], indirect=True)
def test_gradient_descent_cross_entropy_matches_scipy(dtype):
    x, xt, _, _, _ = make_data(10, k=3)
    labels = np.eye(3)[np.arange(8) % 3]
    _, kdd = relu_kernels(x, x)
    _, ktd = relu_kernels(xt, x)

    def xent(fx, y_hat):
        return -jnp.mean(jax.nn.log_softmax(fx) * y_hat)

    lr, t = 3.0, 50.0
    predict_fn = predict.gradient_descent(xent, cast(kdd, dtype), cast(labels, dtype), lr)
    fx_train, fx_test = predict_fn(t, 0.0, 0.0, cast(ktd, dtype))

    def rhs(_, z):  # z = [f_train; f_test] flattened; float64 NumPy
        f = z[:24].reshape(8, 3)
        p = np.exp(f - f.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        grad = (p - labels) / labels.size  # d/df of mean(-y log softmax f), rows sum y = 1
        return -lr * np.concatenate([(kdd @ grad).ravel(), (ktd @ grad).ravel()])

    sol = scipy.integrate.solve_ivp(rhs, (0, t), np.zeros(24 + 15), rtol=1e-10, atol=1e-12)
    rel_close(fx_train, sol.y[:24, -1].reshape(8, 3), dtype, f32=1e-4, f64=1e-7)
    rel_close(fx_test, sol.y[24:, -1].reshape(5, 3), dtype, f32=1e-4, f64=1e-7)
    assert float(xent(fx_train, labels)) < float(xent(jnp.zeros((8, 3)), labels))


# ---------------------------------------------------------------------------------------------
# gradient_descent_mse_ensemble.
# ---------------------------------------------------------------------------------------------


def ensemble_reference(x, xt, y, t, lr, get, diag_reg=0.0):
    """Mean/cov of f(t) = f(0) + A(t) (y - f_train(0)) with f(0) ~ N(0, NNGP), float64."""
    nngp_dd, ntk_dd = relu_kernels(x, x)
    nngp_td, ntk_td = relu_kernels(xt, x) if xt is not None else relu_kernels(x, x)
    nngp_tt, _ = relu_kernels(xt, xt) if xt is not None else relu_kernels(x, x)
    k_dyn = {"nngp": nngp_dd, "ntk": ntk_dd}[get]
    k_dyn = k_dyn + diag_reg * np.trace(k_dyn) / len(k_dyn) * np.eye(len(k_dyn))
    k_td = {"nngp": nngp_td, "ntk": ntk_td}[get]
    a = lr * t / y.size
    if xt is None:  # train: f = y + E (f0 - y)
        e = scipy.linalg.expm(-a * k_dyn)
        return (np.eye(len(x)) - e) @ y, e @ nngp_dd @ e.T
    mat = k_td @ np.linalg.solve(k_dyn, np.eye(len(x)) - scipy.linalg.expm(-a * k_dyn))
    mean = mat @ y
    cov = nngp_tt - mat @ nngp_td.T - nngp_td @ mat.T + mat @ nngp_dd @ mat.T
    return mean, cov


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("on_test", [True, False])
def test_ensemble_matches_reference(dtype, get, on_test):
    x, xt, y, _, _ = make_data(11)
    lr, ts = 1.5, [0.0, 4.0, 60.0]
    predict_fn = predict.gradient_descent_mse_ensemble(relu_kernel_fn, cast(x, dtype),
                                                       cast(y, dtype), lr)
    out = predict_fn(np.array(ts), cast(xt, dtype) if on_test else None, get, compute_cov=True)
    assert isinstance(out, predict.Gaussian)
    assert out.mean.shape == (3,) + ((5, 2) if on_test else (8, 2))
    for i, t in enumerate(ts):
        mean, cov = ensemble_reference(x, xt if on_test else None, y, t, lr, get)
        rel_close(out.mean[i], mean, dtype, f32=5e-3, f64=1e-8)
        rel_close(out.covariance[i], cov, dtype, f32=5e-3, f64=1e-8)
    # t = 0: the prior (mean 0, covariance NNGP)
    np.testing.assert_allclose(out.mean[0], 0, atol=1e-6)
    mean_only = predict_fn(4.0, cast(xt, dtype) if on_test else None, get)
    rel_close(mean_only, out.mean[1], dtype, f32=1e-5, f64=1e-12)


def test_ensemble_infinite_time_and_get_forms(dtype):
    x, xt, y, _, _ = make_data(12)
    c = lambda a: cast(a, dtype)
    predict_fn = predict.gradient_descent_mse_ensemble(relu_kernel_fn, c(x), c(y), 1.0,
                                                       diag_reg=1e-3)
    inf = predict_fn(None, c(xt), None, compute_cov=True)
    assert inf._fields == ("nngp", "ntk")
    kdd = relu_kernel_fn(c(x), None, ("nngp", "ntk"))
    ktd = relu_kernel_fn(c(xt), c(x), ("nngp", "ntk"))
    ktt = relu_kernel_fn(c(xt), None, ("nngp", "ntk"))
    gp = predict.gp_inference(kdd, c(y), diag_reg=1e-3)(("nngp", "ntk"), ktd, ktt)
    for g in ("nngp", "ntk"):
        np.testing.assert_allclose(getattr(inf, g).mean, getattr(gp, g).mean, **tol(dtype))
        np.testing.assert_allclose(getattr(inf, g).covariance, getattr(gp, g).covariance,
                                   **tol(dtype))
        kmat = relu_kernels(x, x)[0 if g == "nngp" else 1]
        kmat = kmat + 1e-3 * np.trace(kmat) / 8 * np.eye(8)
        t_big = 40 * y.size / np.linalg.eigvalsh(kmat)[0]
        big = predict_fn(t_big, c(xt), g, compute_cov=True)
        f32 = 2e-2
        rel_close(big.mean, getattr(inf, g).mean, dtype, f32=f32, f64=1e-7)
        rel_close(big.covariance, getattr(inf, g).covariance, dtype, f32=f32, f64=1e-7)
    train = predict_fn(None, None, "ntk", compute_cov=True)
    np.testing.assert_array_equal(train.mean, np.asarray(y, dtype))
    pair = predict_fn(2.0, c(xt), ("ntk",))
    assert pair._fields == ("ntk",)


@jax.jit
def _times_identity_outputs(k):
    """(n1, n2) -> (n1, n2, 2, 2) kernel: the same kernel for 2 independent outputs."""
    return jnp.einsum("ij,ab->ijab", k, jnp.eye(2, dtype=k.dtype))


def test_ensemble_full_output_kernels(dtype):
    # A kernel_fn with (n1, n2, k, k) outputs used with trace_axes=() equals the (n1, n2) one
    # used with trace_axes=(-1,) when the output block is the identity.
    x, xt, y, _, _ = make_data(13)

    def full_kernel_fn(x1, x2=None, get=None):
        k = relu_kernel_fn(x1, x2, get)
        expand = _times_identity_outputs
        if isinstance(get, str):
            return expand(k)
        return type(k)(*(expand(v) for v in k))

    c = lambda a: cast(a, dtype)
    a = predict.gradient_descent_mse_ensemble(relu_kernel_fn, c(x), c(y))(
        np.array([1.0, 10.0]), c(xt), "ntk", compute_cov=True)
    b = predict.gradient_descent_mse_ensemble(full_kernel_fn, c(x), c(y), trace_axes=())(
        np.array([1.0, 10.0]), c(xt), "ntk", compute_cov=True)
    rel_close(b.mean, a.mean, dtype, f32=1e-4, f64=1e-10)
    assert b.covariance.shape == (2, 5, 5, 2, 2)
    rel_close(b.covariance[..., 0, 0], a.covariance, dtype, f32=1e-4, f64=1e-10)
    scale = np.max(np.abs(np.asarray(a.covariance)))
    np.testing.assert_allclose(b.covariance[..., 0, 1], 0, atol=1e-5 * scale)


def test_ensemble_kernel_fn_kwargs_and_calls():
    calls = []
    x, xt, y, _, _ = make_data(14)

    def kernel_fn(x1, x2=None, get=None, scale=1.0, pair=None):
        calls.append((x1.shape[0], None if x2 is None else x2.shape[0], get, scale, pair))
        out = relu_kernel_fn(x1, x2, get)
        if isinstance(get, str):
            return out * scale
        return type(out)(*(v * scale for v in out))

    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x, y, scale=2.0,
                                                       pair=(np.ones(1), np.zeros(1)))
    predict_fn(1.0, xt, ("nngp", "ntk"), compute_cov=True)
    predict_fn(2.0, xt, "ntk", compute_cov=True)  # train kernels cached: no new train call
    train_calls = [cl for cl in calls if cl[0] == 8 and cl[1] is None]
    assert len(train_calls) == 1 and train_calls[0][2] == ("nngp", "ntk")
    calls.clear()
    predict_fn(1.0, xt, "nngp", pair=(2 * np.ones(1), 3 * np.ones(1)))
    (td_call,) = calls
    np.testing.assert_array_equal(td_call[4][0], 2 * np.ones(1))  # (test's x1, train's x1)
    np.testing.assert_array_equal(td_call[4][1], np.ones(1))
    with pytest.raises(ValueError, match="scale"):
        predict_fn(1.0, xt, "nngp", scale=3.0)


# ---------------------------------------------------------------------------------------------
# jit, grad, numerics, errors.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64"], indirect=True)  # dtype-independent; f64 for FD
def test_jit_and_grad(dtype):
    x, xt, y, f0, ft0 = make_data(15)
    c = lambda a: cast(a, dtype)
    _, kdd = relu_kernels(x, x)
    _, ktd = relu_kernels(xt, x)
    predict_fn = predict.gradient_descent_mse(c(kdd), c(y))
    eager = predict_fn(np.array([1.0, 5.0]), c(f0), c(ft0), c(ktd))
    jitted = jax.jit(predict_fn)(jnp.array([1.0, 5.0], dtype), c(f0), c(ft0), c(ktd))
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(e, j, **tol(dtype))
    inf = jax.jit(lambda a, b: predict_fn(None, a, b, c(ktd)))(c(f0), c(ft0))
    np.testing.assert_allclose(inf[1], predict_fn(None, c(f0), c(ft0), c(ktd))[1], **tol(dtype))

    # built inside jit/grad with a traced kernel (e.g. kernel hyperparameter learning)
    def test_loss(scale):
        p = predict.gradient_descent_mse(scale * c(kdd), c(y))
        return jnp.sum(p(3.0, None, 0.0, scale * c(ktd)) ** 2)

    g = jax.jit(jax.grad(test_loss))(jnp.asarray(1.3, dtype))
    eps = 1e-3 if dtype == np.float32 else 1e-6
    fd = (test_loss(jnp.asarray(1.3 + eps, dtype)) - test_loss(jnp.asarray(1.3 - eps, dtype))
          ) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=2e-2 if dtype == np.float32 else 1e-6)

    def gp_loss(scale):
        return jnp.sum(predict.gp_inference(scale * c(kdd), c(y))("ntk", c(ktd)) ** 2)

    assert np.isfinite(jax.jit(jax.grad(gp_loss))(jnp.asarray(0.7, dtype)))

    ens = predict.gradient_descent_mse_ensemble(relu_kernel_fn, c(x), c(y))
    jit_ens = jax.jit(ens, static_argnames=("get", "compute_cov"))
    out = jit_ens(jnp.asarray(2.0, dtype), c(xt), get="ntk", compute_cov=True)
    np.testing.assert_allclose(out.mean, ens(2.0, c(xt), "ntk", True).mean, **tol(dtype))


def test_not_positive_definite_falls_back_to_pseudo_inverse(dtype):
    rng = np.random.default_rng(16)
    feats = rng.normal(size=(6, 3))  # rank-3 kernel on 6 points
    kdd = feats @ feats.T
    kdd[0, 0] -= 1e-3  # slightly indefinite: Cholesky fails in both precisions
    ktd = rng.normal(size=(2, 3)) @ feats.T
    y = feats @ rng.normal(size=(3, 1))  # targets in the kernel's range
    want = ktd @ np.linalg.pinv(kdd, rcond=1e-3, hermitian=True) @ y
    predict_fn = predict.gp_inference(cast(kdd, dtype), cast(y, dtype))
    with pytest.warns(UserWarning, match="positive definite"):
        got = predict_fn("nngp", cast(ktd, dtype))
    assert np.all(np.isfinite(got))
    rel_close(got, want, dtype, f32=1e-2, f64=1e-3)  # 1e-3 perturbation of the kernel
    # under jit the fallback is silent (lax.cond) and gives the same answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jitted = jax.jit(lambda k: predict.gp_inference(k, cast(y, dtype))(
            "nngp", cast(ktd, dtype)))(cast(kdd, dtype))
    np.testing.assert_allclose(jitted, got, rtol=1e-3, atol=1e-3)
    # finite times with zero/negative eigenvalues: finite, no NaN
    mse_fn = predict.gradient_descent_mse(cast(kdd, dtype), cast(y, dtype))
    for out in mse_fn(np.array([0.0, 1.0, np.inf]), 0.0, 0.0, cast(ktd, dtype)):
        assert np.all(np.isfinite(out))


def test_errors():
    x, xt, y, _, _ = make_data(17)
    _, kdd = relu_kernels(x, x)
    _, ktd = relu_kernels(xt, x)
    with pytest.raises(ValueError, match=r"k_train_train has shape \(8, 8\).*trace_axes"):
        predict.gradient_descent_mse(kdd, y, trace_axes=())
    with pytest.raises(ValueError, match=r"k_train_train has shape \(7, 7\)"):
        predict.gp_inference(kdd[:7, :7], y)("nngp", ktd)
    with pytest.raises(ValueError, match="k_test_train has shape"):
        predict.gradient_descent_mse(kdd, y)(1.0, 0.0, 0.0, ktd[:, :7])
    with pytest.raises(ValueError, match="batch axis"):
        predict.gradient_descent_mse(kdd, y[:, 0])
    with pytest.raises(ValueError, match="trace_axes"):
        predict.gradient_descent_mse(kdd, y, trace_axes=(5,))
    predict_fn = predict.gradient_descent_mse(kdd, y)
    with pytest.raises(ValueError, match="k_test_train"):
        predict_fn(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="nothing to predict"):
        predict_fn(1.0, None, None)
    with pytest.raises(ValueError, match="fx_train_0 has shape"):
        predict_fn(1.0, np.zeros((3, 2)))
    with pytest.raises(TypeError, match="must be an array"):
        predict.gradient_descent_mse(KernelPair(kdd, kdd), y)
    gp = predict.gp_inference(kdd, y)
    with pytest.raises(ValueError, match="'bogus'"):
        gp("bogus", ktd)
    with pytest.raises(ValueError, match="unique"):
        gp(("nngp", "nngp"), ktd)
    with pytest.raises(ValueError, match="needs both NNGP and NTK"):
        gp("ntk", ktd, relu_kernels(xt, xt)[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        predict.gp_inference(np.full((8, 8), np.nan), y)("nngp", ktd)
    ens = predict.gradient_descent_mse_ensemble(relu_kernel_fn, x, y)
    with pytest.raises(ValueError, match="ntkgp"):
        ens(1.0, xt, "ntkgp")
    ens_bad = predict.gradient_descent_mse_ensemble(relu_kernel_fn, x, y, trace_axes=())
    with pytest.raises(ValueError, match="kernel_fn"):
        ens_bad(1.0, xt, "nngp")
    mse = lambda f, yy: 0.5 * jnp.mean((f - yy) ** 2)
    ode_fn = predict.gradient_descent(mse, kdd, y)
    with pytest.raises(ValueError, match="finite times"):
        ode_fn(None, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        ode_fn(-1.0, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        ode_fn(1.0, predict.ODEState(np.zeros((8, 2)), None, np.zeros((8, 2))))


# ---------------------------------------------------------------------------------------------
# Integration with the rest of the project (skipped until those pieces exist).
# ---------------------------------------------------------------------------------------------


def _flax_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(2)(x)

    return MLP()


def test_with_im_kernel_fn():
    im = pytest.importorskip("infinite_modules")
    if not callable(getattr(im, "kernel_fn", None)):
        pytest.skip("infinite_modules.kernel_fn not available yet")
    x, xt, y, _, _ = make_data(18, m=8)  # m = n: one kernel compilation for all calls
    x, xt, y = (jnp.asarray(a, jnp.float32) for a in (x, xt, y))
    kernel_fn = im.kernel_fn(_flax_mlp(), x)
    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x, y, diag_reg=1e-4)
    inf = predict_fn(None, xt, "ntk", compute_cov=True)
    kdd = kernel_fn(x, None, ("nngp", "ntk"))
    ktd = kernel_fn(xt, x, ("nngp", "ntk"))
    gp = predict.gp_inference(kdd, y, diag_reg=1e-4)("ntk", ktd, kernel_fn(xt, None, "nngp"))
    np.testing.assert_allclose(inf.mean, gp.mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inf.covariance, gp.covariance, rtol=1e-4, atol=1e-4)
    finite = predict_fn(np.array([0.0, 10.0]), xt, ("nngp", "ntk"), compute_cov=True)
    assert finite.ntk.mean.shape == (2, 8, 2)
    assert np.all(np.isfinite(finite.ntk.covariance))
    np.testing.assert_allclose(finite.ntk.mean[0], 0, atol=1e-6)


def test_with_interop_empirical_ntk():
    interop = pytest.importorskip("interop")
    if not callable(getattr(interop, "empirical_ntk_fn", None)):
        pytest.skip("interop.empirical_ntk_fn not available yet")
    model = _flax_mlp()
    x, xt, y, _, _ = make_data(19, m=8)
    x, xt = jnp.asarray(x, jnp.float32), jnp.asarray(xt, jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    ntk_fn = interop.empirical_ntk_fn(model, trace_axes=(), vmap_axes=0,
                                      implementation="jacobian_contraction")
    kdd, ktd = ntk_fn(x, None, variables), ntk_fn(xt, x, variables)
    assert kdd.shape == (8, 8, 2, 2)
    # the linearized network f0 + J dw trained by discrete GD, with J from jax.jacobian
    flat, unravel = flatten_util.ravel_pytree(variables)
    jac = jax.jit(jax.jacobian(lambda w, xx: model.apply(unravel(w), xx)))
    j_tr, j_te = (np.asarray(jac(flat, xx), np.float64).reshape(16, -1) for xx in (x, xt))
    f0, ft0 = (np.asarray(model.apply(variables, xx), np.float64) for xx in (x, xt))
    lr = 0.02 * float(predict.max_learning_rate(kdd, y.size))
    steps = 500
    dw = np.zeros(j_tr.shape[1])
    for _ in range(steps):
        dw -= lr * j_tr.T @ (f0.ravel() + j_tr @ dw - y.ravel()) / y.size
    fx_train, fx_test = predict.gradient_descent_mse(kdd, y, lr, trace_axes=())(
        float(steps), f0, ft0, ktd)
    for got, want, start in [(fx_train, f0 + (j_tr @ dw).reshape(8, 2), f0),
                             (fx_test, ft0 + (j_te @ dw).reshape(8, 2), ft0)]:
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want - start))
        assert err < 0.05, err
