"""Attention with 1/sqrt(head_dim) logits: random attention weights, estimated moments.

Infinite-width limit with H heads fixed and head_dim C -> infinity (Hron et al. 2020,
"Infinite attention: NNGP and NTK for deep attention networks", Sec. 3). The logits
  S(a, q, k) = C^{-1/2} sum_c Q(a, q)_c K(a, k)_c
of independent zero-mean query and key fields Q, K (G-vars of independent weights)
converge to a centered Gaussian process over (input, query, key), independent across
heads and of the values V, with covariance
  Cov(S(a, q, k), S(b, q', k')) = E[Q(a, q) Q(b, q')] E[K(a, k) K(b, k')].
The attention weights P = softmax(S) (after any mask or bias, applied sample-wise) stay
random, so a head's output O(a, q) = sum_k P_a(q, k) V(a, k) is Gaussian only
conditionally on P: its channels share P (a Gaussian scale mixture,
`Root.random_moments`). Its second moments (what a Monte Carlo over wide inits of the
real model measures) are
  nngp'(a, b; q, q') = E_S[ sum_{k,k'} P_a(q, k) P_b(q', k') Sigma_V(a, k; b, k') ],
and the expected NTK adds to E[P Theta_V P'] the logits' tangent contribution
  E_{S,V}[ sum_{k,k'} dO_a(q)/dS_a(q, k) dO_b(q')/dS_b(q', k') Theta_S ],
  dO(q)/dS(q, k) = P(q, k) (V(k) - O(q)),
  Theta_S = Theta_Q(a, q; b, q') Sigma_K(a, k; b, k') + Sigma_Q(a, q; b, q') Theta_K(a, k; b, k'),
whose expectation over V given P is a polynomial in P (`_logits_tangent`). Gradient
cross terms between the query, key and value paths are O(C^{-1/2}) and vanish.

No finite-dimensional closed form exists for E[softmax softmax'] of Gaussian logits,
so the expectations are estimated by Monte Carlo over the logits with a fixed seed:
`SAMPLES` draws (antithetic pairs S, -S), jointly Gaussian over both inputs of each pair
(a, b) and all their (query, key) positions (a Cholesky factor of the covariance plus a
relative `JITTER`; the same standard normals for every pair: common random numbers),
averaged over the H i.i.d. heads. The step
is recorded on the `Kernel` (`Interpreter.record_estimate`) with `ERROR_SIGMAS`
standard errors of the estimated entries as its error bound.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import moments as mo
from infinite_modules.errors import UnsupportedPrimitiveError
from infinite_modules.interpreter import RULES, Interpreter, enter_call
from infinite_modules.values import Field, ParamRef, Root, is_group

SAMPLES = 2048  # logit draws per pair of inputs (1024 antithetic pairs)
SEED = 0
ERROR_SIGMAS = 4.0

_HINT = ("Use logits scaled by 1/head_dim (a custom `attention_fn`: deterministic "
         "attention weights, exact), or `interop.monte_carlo_kernel_fn` for a Monte Carlo "
         "estimate of the whole kernel.")


class MixtureError(UnsupportedPrimitiveError):
  """A nonlinear step after a Gaussian scale mixture: `api` then computes the kernel one
  draw of the attention logits at a time (`logit_draws`), where no mixture arises."""


def mixture_error(eqn, root: Root, what: str):
  """The error for `what` applied to a Gaussian scale mixture (`Root.random_moments`)."""
  error = eqn.error(
      f"{what} is applied to a field whose channels share finitely many random variables "
      f"({root.random_moments}): its channel averages stay random at infinite width, so it "
      "is a Gaussian scale mixture, not a Gaussian, and its kernel after a nonlinearity or "
      "a normalisation needs the joint law of those variables (not implemented; only linear "
      "layers, sums and pooling after such a block have exact second moments).",
      "Read the block out linearly (Dense/mean pooling), use 1/head_dim attention logits "
      "(deterministic weights), or `interop.monte_carlo_kernel_fn`.")
  return MixtureError(str(error))


# Relative jitter added to the logits' covariance so that its Cholesky factor exists when
# it is singular (an input paired with itself, repeated positions): the logits' variance
# grows by this fraction of the largest one, far below the Monte Carlo error.
JITTER = 1e-5


def _draw_sqrt(cov):
  """The Cholesky factor L (L L^T = cov + jitter, batched): unique, so float32 and float64
  kernels (and any batching) see the same draws, unlike an eigendecomposition whose
  eigenvectors are arbitrary within the degenerate eigenspaces of a Kronecker product."""
  cov = (cov + jnp.swapaxes(cov, -1, -2)) / 2
  scale = jnp.max(jnp.diagonal(cov, axis1=-2, axis2=-1), axis=-1)
  jitter = JITTER * jnp.maximum(scale, jnp.finfo(cov.dtype).tiny)
  eye = jnp.eye(cov.shape[-1], dtype=cov.dtype)
  return jnp.linalg.cholesky(cov + jitter[..., None, None] * eye)


def sample(interp: Interpreter, eqn, logits) -> Sampled:
  """Monte Carlo draws of the Gaussian limit of C^{-1/2} sum_c Q_c K_c (module docstring)."""
  where = f" (logits computed in `{logits.where}`)" if logits.where else ""
  q, k = logits.query, logits.key
  if q is k:
    raise eqn.error(
        f"attention logits scaled by 1/sqrt(head_dim){where} with queries and keys from the "
        "same projection (tied weights): their mean sqrt(head_dim) E[q k] diverges at "
        "infinite width.", _HINT)
  for root in (q, k):
    if root.random_moments is not None:
      raise mixture_error(eqn, root, "an attention layer")
    if root.mean1 is not None or root.mean2 is not None:
      raise eqn.error(
          f"attention logits scaled by 1/sqrt(head_dim){where} with queries or keys of "
          "non-zero mean (a non-zero deterministic bias): the logits' mean diverges at "
          "infinite width.", _HINT)
  if not interp.full:
    raise mo.NeedFullLayout()
  cached = interp.materialized.get(("gaussian logits", id(logits)))
  if cached is not None:  # every use of one logits value sees the same draws
    return cached[1]
  out = _draw(interp, logits)
  interp.materialized[("gaussian logits", id(logits))] = (logits, out)  # keeps the id alive
  return out


def _draw(interp: Interpreter, logits) -> Sampled:
  q, k = logits.query, logits.key
  layout = logits.layout
  groups = [a[1] for a in layout if is_group(a)]
  heads = int(np.prod(groups))
  lq, lk = q.spatial[0], k.spatial[0]
  m = lq * lk
  n1, n2 = interp.n1, interp.n2

  def block(qm, km):  # Cov over (q, k) x (q', k'): E[Q Q'] E[K K']
    c = qm[..., :, None, :, None] * km[..., None, :, None, :]
    return c.reshape(c.shape[:-4] + (m, m))

  c11, c22, c12 = block(q.var1, k.var1), block(q.var2, k.var2), block(q.nngp, k.nngp)
  pair = jnp.concatenate([
      jnp.concatenate([jnp.broadcast_to(c11[:, None], (n1, n2, m, m)), c12], -1),
      jnp.concatenate([jnp.swapaxes(c12, -1, -2),
                       jnp.broadcast_to(c22[None], (n1, n2, m, m))], -1)], -2)
  # A fresh stream for each attention layer of the model (in trace order).
  layer = sum(1 for key in interp.materialized if key[0] == "gaussian logits")
  key = jax.random.fold_in(jax.random.PRNGKey(SEED), layer)
  half = SAMPLES // 2
  # Drawn in float32 whatever the kernel dtype, so float32 and float64 kernels share draws.
  if interp.logit_draw is not None:  # one draw, sign +-1 (`logit_draws`: n1 = n2 = 1)
    draw_key, sign = interp.logit_draw
    key = jax.random.fold_in(draw_key, layer)
    z = sign * jax.random.normal(key, (1, heads, 2 * m), jnp.float32).astype(interp.dtype)
  else:
    # Common random numbers across pairs and antithetic pairs (S, -S) within each.
    z = jax.random.normal(key, (half, heads, 2 * m), jnp.float32).astype(interp.dtype)
    z = jnp.concatenate([z, -z])
  draws = z.shape[0]
  s = jnp.einsum("abij,nhj->nabhi", _draw_sqrt(pair).astype(interp.dtype), z)
  s1 = s[..., :m].reshape(draws, n1, n2, heads, lq, lk)
  s2 = s[..., m:].reshape(draws, n1, n2, heads, lq, lk)
  # Each side of a pair's draw is a draw of that input's logits alone: those of the
  # first partner serve for the second moments within a batch (one factorization).
  d1, d2 = s1[:, None, :, 0], s2[:, None, 0]
  shape1, shape2 = jnp.shape(logits.sum1), jnp.shape(logits.sum2)
  return Sampled(
      pair1=_arrange(jnp.swapaxes(s1, 1, 2), layout, groups, shape1),
      pair2=_arrange(s2, layout, groups, shape2),
      diag1=_arrange(d1, layout, groups, shape1), diag2=_arrange(d2, layout, groups, shape2),
      batch_axis=layout.index("b"), query=q, key=k, where=logits.where, draw=object())


def _arrange(s, layout, groups, shape):
  """(N, partner, n, H, Lq, Lk) -> (N, partner, *shape) in the logits' output layout."""
  lead = s.shape[:2]
  s = s.reshape(lead + (s.shape[2], *groups, s.shape[-2], s.shape[-1]))
  g = len(groups)
  order, group_index = [], 0
  for atom in layout:
    if atom == "b":
      order.append(2)
    elif is_group(atom):
      order.append(3 + group_index)
      group_index += 1
    elif atom == "q":
      order.append(3 + g)
    elif atom == "k":
      order.append(4 + g)
  s = jnp.transpose(s, (0, 1, *order))
  return s.reshape(lead + tuple(shape))


@dataclasses.dataclass(frozen=True, eq=False)
class Sampled:
  """Monte Carlo draws of a function of Gaussian attention logits, per side.

  `pair1` (N, n2, *shape1) and `pair2` (N, n1, *shape2) hold, for each pair (a, b) of
  inputs, the two sides' values in draw n of their joint law; `diag1`/`diag2`
  (N, 1, *shape) the draws of each input alone (for the second moments within a batch).
  Any primitive of these and input-dependent values is evaluated draw by draw (masks,
  biases, the softmax); a product with a value field applies the weights
  (`apply_weights`); any other use is refused.
  """
  pair1: jax.Array
  pair2: jax.Array
  diag1: jax.Array
  diag2: jax.Array
  batch_axis: int
  query: Root
  key: Root
  where: str
  draw: object  # the same for every value computed from one set of draws

  def consumed_by(self, interp, eqn, invals):
    if RULES.get(eqn.name) is enter_call:
      return enter_call(interp, eqn, invals)
    if eqn.name == "dot_general" and any(isinstance(v, Field) for v in invals):
      lhs, rhs = invals
      if lhs is self and isinstance(rhs, Field):
        return apply_weights(interp, eqn, self, rhs, True)
      if rhs is self and isinstance(lhs, Field):
        return apply_weights(interp, eqn, self, lhs, False)
    invals = [_same_draw(interp, eqn, self, v) for v in invals]
    if any(isinstance(v, (Field, ParamRef)) for v in invals) or any(
        isinstance(v, Sampled) and v.draw is not self.draw for v in invals):
      raise self.resolve(eqn)
    return self._evaluate(eqn, invals)

  def resolve(self, eqn):
    where = f" (logits computed in `{self.where}`)" if self.where else ""
    return eqn.error(
        f"random attention weights (1/sqrt(head_dim) logits{where}) are used by `{eqn.name}` "
        "other than through functions of the logits and inputs and a product with a value "
        "field, which is not supported.", _HINT)

  def _evaluate(self, eqn, invals):
    """The primitive applied draw by draw (vmapped over the draw and partner axes)."""
    sampled = [i for i, v in enumerate(invals) if isinstance(v, Sampled)]
    outs = []
    for side, e in ((1, eqn.e1), (2, eqn.e2)):
      fixed = [None if i in sampled else (v.v1 if side == 1 else v.v2)
               for i, v in enumerate(invals)]

      def apply(*xs, e=e, fixed=fixed):
        drawn = dict(zip(sampled, xs))
        vals = [drawn.get(i, f) for i, f in enumerate(fixed)]
        out = e.primitive.bind(*vals, **e.params)
        return list(out) if e.primitive.multiple_results else [out]

      names = ("pair1", "diag1") if side == 1 else ("pair2", "diag2")
      outs.append([jax.vmap(jax.vmap(apply))(*[getattr(invals[i], name) for i in sampled])
                   for name in names])
    results = []
    for k in range(len(eqn.e1.outvars)):
      axis = eqn.out_batch_axis(k)
      if axis is None:
        raise eqn.error("it combines the random attention weights of different examples.",
                        _HINT)
      (p1, d1), (p2, d2) = [[o[k] for o in side] for side in outs]
      results.append(dataclasses.replace(self, pair1=p1, pair2=p2, diag1=d1, diag2=d2,
                                         batch_axis=axis))
    return results


def _same_draw(interp, eqn, sampled: Sampled, v):
  """Pending logits next to their own draws are those draws (sampled once, cached)."""
  if hasattr(v, "consumed_by") and not isinstance(v, Sampled):
    if not hasattr(v, "query"):
      raise sampled.resolve(eqn)
    return sample(interp, eqn, v)
  return v


def _per_head(eqn, weights: Sampled, arr, pb, pc, p_free, head_axes):
  """(N, partner, *shape) -> (N, partner, n, H, Lq, Lk)."""
  lead = 2
  axes = [weights.batch_axis, *head_axes, p_free, pc]
  rest = [i for i in range(arr.ndim - lead) if i not in axes]
  if any(arr.shape[lead + i] != 1 for i in rest):
    raise eqn.error("random attention weights with unexpected extra axes.", _HINT)
  arr = jnp.transpose(arr, (0, 1, *[lead + i for i in axes], *[lead + i for i in rest]))
  n = arr.shape[2]
  h = int(np.prod([arr.shape[3 + j] for j in range(len(head_axes))]))
  lq, lk = arr.shape[3 + len(head_axes)], arr.shape[4 + len(head_axes)]
  return arr.reshape(arr.shape[:2] + (n, h, lq, lk))


def apply_weights(interp: Interpreter, eqn, weights: Sampled, field: Field,
                  weights_first: bool):
  """O = P V for random attention weights P: estimated second moments (module docstring)."""
  from infinite_modules.rules.attention import value_product_axes
  pc, pb, vc, vb, v_batch = value_product_axes(
      eqn, field, weights.batch_axis, weights_first, "random attention weights", _HINT)
  ndim = weights.pair1.ndim - 2
  p_free = [i for i in range(ndim) if i not in pc and i not in pb]
  if len(p_free) != 1 or len(pc) != 1:
    raise eqn.error("attention weights must have one query and one key axis.", _HINT)
  if not interp.full:
    raise mo.NeedFullLayout()
  from infinite_modules.rules.linear import materialize
  v = materialize(interp, eqn, field)
  if v.random_moments is not None:
    raise mixture_error(eqn, v, "an attention layer")
  if v.mean1 is not None or v.mean2 is not None:
    raise eqn.error(
        "random attention weights applied to values of non-zero mean (a non-zero "
        "deterministic bias): the output's channel mean would stay random, which is not "
        "tracked.", _HINT)
  head_axes = [pb[j] for j, atoms in enumerate(v_batch) if atoms != ("b",)]
  per_head = lambda arr: _per_head(eqn, weights, arr, pb, pc[0], p_free[0], head_axes)
  pa = jnp.swapaxes(per_head(weights.pair1), 1, 2)  # (N, n1, n2, H, Lq, Lk)
  pb_ = per_head(weights.pair2)
  da, db = per_head(weights.diag1)[:, 0], per_head(weights.diag2)[:, 0]  # (N, n, H, Lq, Lk)
  dt = interp.dtype
  pa, pb_, da, db = (x.astype(dt) for x in (pa, pb_, da, db))

  sandwich = "nabhqk,nabhpl,abkl->nabqp"
  heads = pa.shape[3]
  nngp = jnp.einsum(sandwich, pa, pb_, v.nngp) / heads
  ntk = jnp.einsum(sandwich, pa, pb_, v.ntk) / heads
  q, k = weights.query, weights.key
  ntk = ntk + _logits_tangent(pa, pb_, v.nngp, q, k) / heads
  var1 = jnp.einsum("nahqk,nahpl,akl->naqp", da, da, v.var1) / heads
  var2 = jnp.einsum("nahqk,nahpl,akl->naqp", db, db, v.var2) / heads
  v_free = [field.axes[i] for i in range(len(field.axes)) if i not in vc and i not in vb]
  free = ([(0,)] + v_free) if weights_first else (v_free + [(0,)])
  if interp.logit_draw is not None:
    # One draw of the logits (n1 = n2 = 1, `logit_draws`): given it, the output's channels
    # are i.i.d. Gaussian with these moments; the average over draws is taken at the end.
    interp.record_estimate(
        eqn, "Monte Carlo over joint draws of the Gaussian 1/sqrt(head_dim) attention "
        f"logits of each pair of inputs ({heads} heads; the whole kernel is averaged over "
        "draws, see `Kernel.error`)", 0.0)
    new = dataclasses.replace(
        v, nngp=nngp[0], ntk=ntk[0], var1=var1[0], var2=var2[0], mean1=None, mean2=None,
        spatial=(pa.shape[4],), gathered_from=None, origins=v.origins | q.origins | k.origins)
    return [Field(new, tuple(list(v_batch) + free))]

  estimates = [_mean_and_error(x) for x in (nngp, ntk, var1, var2)]
  error = ERROR_SIGMAS * jnp.max(jnp.stack([jnp.max(e) for _, e in estimates]))
  interp.record_estimate(
      eqn, f"Monte Carlo over the Gaussian 1/sqrt(head_dim) attention logits ({SAMPLES} "
      f"antithetic draws per pair of inputs, {heads} heads, seed {SEED}; error bound "
      f"{ERROR_SIGMAS:g} standard errors of this step's entries)", error)
  (nngp, _), (ntk, _), (var1, _), (var2, _) = estimates
  where = f"`{weights.where}`" if weights.where else "an attention layer"
  new = dataclasses.replace(
      v, nngp=nngp, ntk=ntk, var1=var1, var2=var2, mean1=None, mean2=None,
      spatial=(pa.shape[4],), gathered_from=None, gaussian=False, law=None,
      origins=v.origins | q.origins | k.origins,
      random_moments=f"the attention weights of the {heads} heads of {where}")
  return [Field(new, tuple(list(v_batch) + free))]


def _mean_and_error(x):
  """Mean over draws and its standard error (antithetic pairs averaged first)."""
  half = x.shape[0] // 2
  pairs = (x[:half] + x[half:]) / 2
  return jnp.mean(pairs, 0), jnp.std(pairs, 0, ddof=1) / np.sqrt(half)


def _logits_tangent(pa, pb, sigma, q: Root, k: Root):
  """sum over heads of E_V[sum_{k,k'} dO_a(q)/dS_a(q,k) dO_b(q')/dS_b(q',k') Theta_S] per draw.

  With u_b(q', k) = sum_l P_b(q', l) Sigma(k, l), u_a(q, l) = sum_j P_a(q, j) Sigma(j, l)
  and w = P_a Sigma P_b^T, the expectation over V of (V_a(k) - O_a(q)) (V_b(k') - O_b(q'))
  is Sigma(k, k') - u_b(q', k) - u_a(q, k') + w(q, q'); for a kernel M over key positions
    F_M = P_a (Sigma o M) P_b^T - sum_k P_a(q,k) u_b(q',k) (M P_b^T)(k,q')
          - sum_l P_b(q',l) u_a(q,l) (P_a M)(q,l) + w o (P_a M P_b^T),
  and the tangent term is Theta_Q o F_{Sigma_K} + Sigma_Q o F_{Theta_K}.
  """
  ub = jnp.einsum("nabhpl,abkl->nabhpk", pb, sigma)
  ua = jnp.einsum("nabhqj,abjl->nabhql", pa, sigma)
  w = jnp.einsum("nabhqk,nabhpl,abkl->nabhqp", pa, pb, sigma)

  def f(m):
    mpb = jnp.einsum("abkl,nabhpl->nabhkp", m, pb)
    pam = jnp.einsum("nabhqk,abkl->nabhql", pa, m)
    return (jnp.einsum("nabhqk,nabhpl,abkl->nabhqp", pa, pb, sigma * m)
            - jnp.einsum("nabhqk,nabhpk,nabhkp->nabhqp", pa, ub, mpb)
            - jnp.einsum("nabhpl,nabhql,nabhql->nabhqp", pb, ua, pam)
            + w * jnp.einsum("nabhqk,nabhkp->nabhqp", pa, mpb))

  out = q.ntk[None, :, :, None] * f(k.nngp) + q.nngp[None, :, :, None] * f(k.ntk)
  return jnp.sum(out, axis=3)
