"""Cost of the pair-law path on Flax's ImageNet ResNet v1 (post-activation blocks, max-pool
stem); prints JSON.

Workload: the `ResNet1` of Flax's examples/imagenet/models.py (7x7 stride-2 stem, eval-mode
BatchNorm, max_pool 3x3 stride 2 SAME, one v1 block `relu(residual + y)`, mean pooling,
Dense), `num_filters=8`, 8x8x3 float32 images, `x2=None`, `get=("nngp", "ntk")`. The
architecture is the one in `tests/test_resnet_examples.py`; ``--blocks 2`` stacks a second
block (the first block's output law is then pushed and compressed: `push_compress`).

Per n: ``first_call_s`` (kernel_fn built, traced, compiled and run once) and ``seconds``
(the minimum over ``--repeats`` further calls, each timed to `block_until_ready`).
``--profile`` also times every pair-law step the first call traced, each jitted on its
own on a random mixture of the same shapes (`pairlaw.push_moments`: the moments of a
law under phi; `pairlaw.push_compress`: moments and binning into the grid): its
``seconds`` (min of 3 after compile) and the shapes. The header records the load average.

  PYTHONPATH=. python benchmarks/pairlaw_resnet.py [--n 4,8,16] [--repeats 2] [--profile] [--blocks 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np

# Appended, so PYTHONPATH decides which checkout is timed (e.g. the code before a change).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

import infinite_modules as im
from infinite_modules import pairlaw


class ResNetBlock(nn.Module):
  filters: int
  conv: object
  norm: object
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
    if residual.shape != y.shape:
      residual = self.norm(name="norm_proj")(
          self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual))
    return nn.relu(residual + y)


class ResNet1(nn.Module):
  num_classes: int = 10
  num_filters: int = 8
  blocks: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for _ in range(self.blocks):
      x = ResNetBlock(self.num_filters, conv=conv, norm=norm)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def _timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


class _Recorder:
  """Wraps the module-level pair-law steps to record what a trace asks of them."""

  def __init__(self):
    self.calls = []
    self._depth = 0
    self._saved = {}

  def __enter__(self):
    for name in ("push_moments", "push_compress"):
      fn = getattr(pairlaw, name)
      self._saved[name] = fn
      setattr(pairlaw, name, self._wrap(name, fn))
    return self

  def __exit__(self, *exc):
    for name, fn in self._saved.items():
      setattr(pairlaw, name, fn)

  def _wrap(self, name, fn):
    def wrapped(x, *args, **kw):
      if self._depth == 0:
        shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), x)
        self.calls.append((name, fn, shapes, args, kw))
      self._depth += 1
      try:
        return fn(x, *args, **kw)
      finally:
        self._depth -= 1
    return wrapped


def _random_mixture(shapes, seed=0):
  """A valid mixture (weights summing to 1, PSD shared part) of the recorded shapes."""
  rng = np.random.default_rng(seed)
  dtype = shapes.a.dtype
  e, k = shapes.a.shape[:-1], shapes.a.shape[-1]
  w = rng.random(e + (k,))
  w /= w.sum(-1, keepdims=True)
  arr = lambda v: jnp.asarray(v, dtype)
  va, vb = 0.5 + rng.random(e), 0.5 + rng.random(e)
  c = 0.6 * np.sqrt(va * vb) * rng.uniform(-1, 1, e)
  t = None if shapes.t is None else arr(rng.random(e + (k,)))
  theta = None if shapes.theta is None else arr(rng.random(e))
  return pairlaw.Mixture(arr(rng.normal(size=e + (k,))), arr(rng.normal(size=e + (k,))),
                         arr(np.broadcast_to(w, shapes.w.shape)), arr(va), arr(vb), arr(c), t,
                         theta)


def _profile(calls):
  out = []
  for name, fn, shapes, args, kw in calls:
    m = _random_mixture(shapes)
    step = jax.jit(lambda m, fn=fn, args=args, kw=kw: fn(m, *args, **kw))
    compile_s = _timed(step, m)
    seconds = min(_timed(step, m) for _ in range(3))
    out.append({"step": name, "entries": int(np.prod(shapes.a.shape[:-1])),
                "components": int(shapes.a.shape[-1]), "tangent": shapes.t is not None,
                "first_s": round(compile_s, 3), "seconds": round(seconds, 3)})
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", default="4,8,16")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--blocks", type=int, default=1)
  args = parser.parse_args()
  print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(), "jax": jax.__version__,
                    "infinite_modules": os.path.dirname(im.__file__)}), flush=True)
  for n in (int(v) for v in args.n.split(",")):
    x = _images(n)
    model = ResNet1(blocks=args.blocks)
    recorder = _Recorder()
    start = time.perf_counter()
    with recorder:
      kernel_fn = im.kernel_fn(model, x, apply_kwargs={"train": False})
      jax.block_until_ready(kernel_fn(x, None, get=("nngp", "ntk")))
    first = time.perf_counter() - start
    call = functools.partial(kernel_fn, x, None, get=("nngp", "ntk"))
    seconds = min(_timed(call) for _ in range(args.repeats))
    row = {"n": n, "blocks": args.blocks, "first_call_s": round(first, 2), "seconds": round(seconds, 2),
           "loadavg": os.getloadavg()}
    if args.profile:
      row["steps"] = _profile(recorder.calls)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
