"""Kernels of large datasets, computed block by block (optionally on several devices)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules.kernel import Kernel, select


def batch(kernel_fn: Callable, batch_size: int, *, progress: bool = True,
          devices: list | None = None) -> Callable:
  """Wraps `kernel_fn(x1, x2, get)` to compute its kernels in blocks.

  The (n1, n2) kernels are assembled from `batch_size x batch_size` blocks,
  so memory is bounded by one block (a full-layout CNN kernel of a block is
  batch_size^2 (HW)^2 numbers). Blocks are spread round-robin over `devices`
  (default: all local devices) and a tqdm progress bar shows the work.
  Every block has the same shape (the last ones are padded by repeating rows)
  so the block computation compiles once.

  Returns:
    `batched(x1, x2=None, get=None)` with `kernel_fn`'s semantics, as numpy
    arrays.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  devices = devices or jax.local_devices()

  def batched(x1, x2=None, get=None):
    select(Kernel(0, 0, 0, 0, (), ()), get)  # validate get early
    x1 = np.asarray(x1)
    # x2=None: the upper blocks only, the diagonal ones as kernel_fn(block, None)
    # (exactly symmetric, correlation 1 on the diagonal), mirrored below it.
    same = x2 is None
    x2 = x1 if same else np.asarray(x2)
    starts1 = range(0, x1.shape[0], batch_size)
    starts2 = range(0, x2.shape[0], batch_size)
    blocks = [(i, j) for i in starts1 for j in starts2 if not same or j >= i]
    iterator = blocks
    if progress:
      from tqdm.auto import tqdm
      iterator = tqdm(blocks, desc="kernel blocks", leave=False)
    out = {name: np.zeros((x1.shape[0], x2.shape[0]), x1.dtype) for name in ("nngp", "ntk")}
    cov1, cov2 = np.zeros(x1.shape[0], x1.dtype), np.zeros(x2.shape[0], x2.dtype)
    for k, (i, j) in enumerate(iterator):
      a, na = _padded(x1, i, batch_size)
      b, nb = _padded(x2, j, batch_size)
      device = devices[k % len(devices)]
      if same and i == j:
        kern = kernel_fn(jax.device_put(a, device), None)
      else:
        kern = kernel_fn(jax.device_put(a, device), jax.device_put(b, device))
      for name in ("nngp", "ntk"):
        block = np.asarray(getattr(kern, name))[:na, :nb]
        out[name][i:i + na, j:j + nb] = block
        if same and j > i:
          out[name][j:j + nb, i:i + na] = block.T
      cov1[i:i + na] = np.asarray(kern.cov1)[:na]
      cov2[j:j + nb] = np.asarray(kern.cov2)[:nb]
    if same:
      cov2 = cov1
    kernel = Kernel(jnp.asarray(out["nngp"]), jnp.asarray(out["ntk"]), jnp.asarray(cov1),
                    jnp.asarray(cov2), tuple(x1.shape), tuple(x2.shape))
    return select(kernel, get)

  return batched


def _padded(x, start, size):
  piece = x[start:start + size]
  n = piece.shape[0]
  if n < size and x.shape[0] >= size:
    # Repeat the block's first row to a full block: one compiled shape.
    piece = np.concatenate([piece, np.repeat(piece[:1], size - n, axis=0)])
  return piece, n
