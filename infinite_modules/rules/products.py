"""Products and gates of fields: `silu(Dense(x)) * Dense(x)` (SwiGLU), GeGLU, `nn.glu`.

Two kinds of products have an exact kernel:

* Dependent factors that are elementwise functions of one field's variable
  (`h * relu(h)`, `h * h`, two slices of the same channel range) are one
  elementwise function of that variable: `rules.elementwise` fuses them into
  phi before any kernel is computed (their joint expectation, never a product
  of kernels).
* Independent factors (disjoint random sources, e.g. two Dense layers, or
  disjoint channel ranges of one: `channels.shared`). Per channel, with f, g
  independent (NT's `FanInProd`; Tensor Programs: functions of independent
  G-vars):
    E[f g f' g'] = E[f f'] E[g g'],     E[f g] = E[f] E[g],
    Theta_fg = E[g g'] Theta_f + E[f f'] Theta_g,
  with uncentered second moments (the factors' means enter through them). The
  cross terms E[g f'] <df, dg'> vanish at infinite width: no parameter acts
  on both factors except through the independent matmuls that made them,
  whose cross tangents average out (as in `linear.add_independent`).

Anything else (factors sharing a source in a way that is not one elementwise
function of one variable: `z * relu(z + b)` with a random bias b, overlapping
channel ranges) raises: their joint law is not tracked, and treating them as
independent would be silently wrong.
"""

from __future__ import annotations

from infinite_modules import channels as ch
from infinite_modules import moments as mo
from infinite_modules.interpreter import Interpreter
from infinite_modules.values import Field, Root

_HINT = ("Multiply functions of one field (h * relu(h)) or independent fields (the outputs "
         "of different Dense/Conv layers, or disjoint channel ranges of one, as in "
         "jnp.split and nn.glu), or use `interop.monte_carlo_kernel_fn` for a Monte Carlo "
         "estimate.")


def multiply_independent(interp: Interpreter, eqn, a: Field, b: Field) -> Field:
  """The field a * b of two independent fields (see the module docstring)."""
  from infinite_modules.rules.linear import _spatial_correspondence, materialize
  if ch.shared(a.root.origins, b.root.origins):
    raise eqn.error(
        "it multiplies two fields that depend on the same random parameters in different "
        "ways (e.g. z * relu(z + b) with a random bias b, or overlapping channel slices), not "
        "as one elementwise function of one field; their joint law is not tracked, and "
        "treating them as independent would give a wrong kernel.", _HINT)
  ra = materialize(interp, eqn, a)
  rb = materialize(interp, eqn, b)
  if ra.channels != rb.channels:
    raise eqn.error("it multiplies fields of different widths.")
  if not (ra.homogeneous or rb.homogeneous):
    raise eqn.error(
        "it multiplies two channel concatenations of different fields: the product's "
        "moments depend on which pieces meet in each channel, which is not tracked.", _HINT)
  rb = mo.permute_spatial(rb, interp.full, _spatial_correspondence(eqn, a, b))
  if ra.spatial != rb.spatial:
    raise eqn.error("it multiplies fields with different spatial sizes.")
  has_mean = ra.mean1 is not None and rb.mean1 is not None
  ma1, ma2 = ra.means()
  mb1, mb2 = rb.means()
  root = Root(
      nngp=ra.nngp * rb.nngp, ntk=ra.ntk * rb.nngp + ra.nngp * rb.ntk,
      var1=ra.var1 * rb.var1, var2=ra.var2 * rb.var2,
      mean1=ma1 * mb1 if has_mean else None, mean2=ma2 * mb2 if has_mean else None,
      spatial=ra.spatial, channels=ra.channels, gaussian=False,
      origins=ra.origins | rb.origins, homogeneous=ra.homogeneous and rb.homogeneous,
      # A factor with random channel averages (attention's scale mixture) makes the
      # product one too: its second moments are exact, its channel averages random.
      random_moments=ra.random_moments or rb.random_moments)
  return Field(root, a.axes)
