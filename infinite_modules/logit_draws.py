"""Kernels after 1/sqrt(head_dim) attention: the average over draws of the logits.

At infinite width with the heads fixed, the logits S of a 1/sqrt(head_dim) attention layer
converge to a Gaussian process (Hron et al. 2020) that is a limit of averages over
infinitely many channels: it is independent of any finite set of channels. Conditionally
on S, the attention output is therefore a Gaussian field with i.i.d. channels, independent
of the residual stream's fields, and every later layer (sums, LayerNorm, whose channel
statistics converge to the conditional moments, nonlinearities, further attention layers
whose logits are Gaussian given the earlier ones) is the ordinary Gaussian kernel
computation given S. The kernel is the expectation over S:
  K(a, b) = E_S[ K(a, b | S_a, S_b) ],
where only the joint law of the logits of the two inputs a, b matters. It is estimated by
Monte Carlo: each pair (a, b) is computed as a one-by-one kernel (so the draw of S_a that
gives its variances is the one that gives its cross entries), for `DRAWS` draws in
antithetic pairs (S, -S) with common random numbers across pairs of inputs; the error bound
is `ERROR_SIGMAS` standard errors of the mean, maximised over the entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DRAWS = 256  # logit draws per pair of inputs (128 antithetic pairs)
CHUNK = 32  # draws computed together (memory bound)
SEED = 0
ERROR_SIGMAS = 4.0


def average(moments_fn, x1, x2, dtype):
  """E over logit draws of the uncentered output moments, per pair of inputs.

  `moments_fn(xa, xb, logit_draw=(key, sign))` returns the moments
  (nngp, ntk, var1, var2, mean1, mean2) of one pair of one-input batches given one draw
  and its interpreter. Returns the averaged moments ((n1, n2), (n1, n2), (n1,), (n2,), and
  the means or None), the interpreter of one pair (for its recorded estimates) and the error
  bound on the nngp and ntk entries.
  """
  n1, n2 = x1.shape[0], x2.shape[0]
  keys = jax.random.split(jax.random.PRNGKey(SEED), DRAWS // 2)
  keys = jnp.concatenate([keys, keys])
  signs = jnp.concatenate([jnp.ones(DRAWS // 2), -jnp.ones(DRAWS // 2)]).astype(dtype)
  interps = []

  def one(xa, xb, key, sign):
    moments, interp = moments_fn(xa[None], xb[None], logit_draw=(key, sign))
    interps.append(interp)
    nngp, ntk, var1, var2, mean1, mean2 = moments
    flat = [nngp[0, 0], ntk[0, 0], var1[0], var2[0], interp.error]
    if mean1 is not None:
      flat += [mean1[0], mean2[0]]
    return jnp.stack([jnp.asarray(f, dtype) for f in flat])

  pairs = jax.vmap(jax.vmap(one, (None, 0, None, None)), (0, None, None, None))

  draws = jax.lax.map(lambda a: jax.vmap(lambda k, s: pairs(x1, x2, k, s))(*a),
                      (keys.reshape(-1, CHUNK, *keys.shape[1:]), signs.reshape(-1, CHUNK)))
  draws = draws.reshape(DRAWS, n1, n2, -1)
  half = DRAWS // 2
  antithetic = (draws[:half] + draws[half:]) / 2
  mean = jnp.mean(antithetic, 0)
  stderr = jnp.std(antithetic, 0, ddof=1) / np.sqrt(half)
  error = ERROR_SIGMAS * jnp.max(stderr[..., :2]) + jnp.max(mean[..., 4])
  var1 = jnp.mean(mean[..., 2], 1)  # every partner's pair gives an estimate of var1
  var2 = jnp.mean(mean[..., 3], 0)
  means = (None, None)
  if mean.shape[-1] > 5:
    means = (jnp.mean(mean[..., 5], 1), jnp.mean(mean[..., 6], 0))
  return (mean[..., 0], mean[..., 1], var1, var2, *means), interps[-1], error.astype(dtype)
