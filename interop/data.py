"""Small real datasets that need no download, ready for kernels and training.

The default dataset is scikit-learn's bundled handwritten digits (1797 grey
8x8 images, 10 classes): it ships inside scikit-learn, so the demo, the
notebooks and the tests run offline.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

__all__ = ["Dataset", "load_digits", "one_hot", "standardize"]

Standardize = Literal["per_example", "per_feature"] | None


class Dataset(NamedTuple):
  """A train/test split with one-hot targets.

  Attributes:
    x_train: inputs, shape `(n_train, 64)` or `(n_train, 8, 8, 1)` (channels last).
    y_train: one-hot targets, shape `(n_train, n_classes)`.
    x_test: inputs, shape `(n_test, ...)`.
    y_test: one-hot targets, shape `(n_test, n_classes)`.
    labels_train: integer class labels, shape `(n_train,)`.
    labels_test: integer class labels, shape `(n_test,)`.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  labels_train: np.ndarray
  labels_test: np.ndarray

  @property
  def n_classes(self) -> int:
    return self.y_train.shape[-1]


def one_hot(labels: np.ndarray, n_classes: int, *, offset: float = 0.0,
            dtype: np.dtype | type = np.float32) -> np.ndarray:
  """One-hot encodes integer `labels`; `offset` is subtracted from every entry.

  `offset=1/n_classes` gives zero-mean targets (each row sums to zero).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype}{labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
    raise ValueError(f"labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}].")
  return (np.eye(n_classes, dtype=np.float64)[labels] - offset).astype(dtype)


def standardize(x_train: np.ndarray, x_test: np.ndarray, mode: Standardize = "per_example",
                eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
  """Standardizes inputs.

  Args:
    x_train, x_test: arrays of shape `(n, ...)`.
    mode: `"per_example"` gives every input zero mean and unit variance over its
      own features (all inputs then have the same norm, which suits NNGP/NTK
      kernels); `"per_feature"` uses the training set's mean and standard
      deviation of each feature for both splits; `None` returns the inputs as is.
    eps: guards the division for constant inputs / features.
  """
  x_train = np.asarray(x_train, np.float64)
  x_test = np.asarray(x_test, np.float64)
  if mode is None:
    return x_train, x_test
  if mode == "per_example":
    def per_example(x):
      axes = tuple(range(1, x.ndim))
      x = x - x.mean(axis=axes, keepdims=True)
      return x / (x.std(axis=axes, keepdims=True) + eps)
    return per_example(x_train), per_example(x_test)
  if mode == "per_feature":
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    return (x_train - mean) / (std + eps), (x_test - mean) / (std + eps)
  raise ValueError(f"standardize mode must be 'per_example', 'per_feature' or None, got {mode!r}.")


def load_digits(n_train: int | None = 1000, n_test: int | None = 500, *, image: bool = False,
                standardize_mode: Standardize = "per_example", target_offset: float = 0.0,
                seed: int = 0, dtype: np.dtype | type = np.float32) -> Dataset:
  """Loads scikit-learn's bundled 8x8 digits, shuffled and split into train / test.

  Args:
    n_train: number of training examples (`None`: all that remain after `n_test`).
    n_test: number of test examples (`None`: all that remain after `n_train`).
    image: return inputs as images `(n, 8, 8, 1)` (channels last, for CNNs)
      instead of flat vectors `(n, 64)`.
    standardize_mode: see `standardize`.
    target_offset: subtracted from the one-hot targets (`0.1` gives NT-style
      `{-0.1, 0.9}` targets that sum to zero).
    seed: seed of the shuffle that picks the split.
    dtype: dtype of inputs and targets (`np.float64` needs `jax_enable_x64` to
      stay float64 inside JAX).

  Returns:
    A `Dataset`.
  """
  try:
    from sklearn.datasets import load_digits as _sk_load_digits
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "interop.data.load_digits needs scikit-learn (it ships the digits dataset): "
        "pip install 'infinite-modules[demo]' or pip install scikit-learn.") from e
  digits = _sk_load_digits()
  x = digits.images[..., None] if image else digits.data
  labels = digits.target.astype(np.int32)
  total = len(labels)
  if n_train is None and n_test is None:
    raise ValueError("Give at least one of n_train and n_test.")
  n_train = total - n_test if n_train is None else n_train
  n_test = total - n_train if n_test is None else n_test
  if n_train <= 0 or n_test < 0 or n_train + n_test > total:
    raise ValueError(
        f"n_train={n_train}, n_test={n_test}: need n_train > 0, n_test >= 0 and "
        f"n_train + n_test <= {total} (the digits dataset has {total} examples).")
  perm = np.random.default_rng(seed).permutation(total)
  train_idx, test_idx = perm[:n_train], perm[n_train:n_train + n_test]
  x_train, x_test = standardize(x[train_idx], x[test_idx], standardize_mode)
  n_classes = int(labels.max()) + 1
  return Dataset(
      x_train=x_train.astype(dtype), y_train=one_hot(labels[train_idx], n_classes,
                                                     offset=target_offset, dtype=dtype),
      x_test=x_test.astype(dtype), y_test=one_hot(labels[test_idx], n_classes,
                                                  offset=target_offset, dtype=dtype),
      labels_train=labels[train_idx], labels_test=labels[test_idx])
