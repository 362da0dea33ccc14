"""A VQ image tokenizer: every image patch becomes the id of its nearest codebook entry.

The codebook is learned by k-means (Lloyd's algorithm, k-means++ start) over patch
vectors, in NumPy, deterministic given the seed. Pixels are scaled to [0, 1].

Shapes (axis legend):
  N images, H = W = image_size pixels, p = patch (pixels per patch side),
  g = H / p patches per side, n = g * g codes per image (raster order), K codebook
  entries, D = p * p * 3 values per patch vector (row, column, channel order), `...`
  any leading axes.
  encode   uint8 [..., H, W, 3]   -> int32 [..., n]      local ids in [0, K)
  decode   int32 [..., n]         -> uint8 [..., H, W, 3]
  codebook float32 [K, D]

`save` writes a small .npz atomically (moma_jax/run_dir.py), so an
interrupted save never leaves a file that looks complete; `load` and every input check
raise `VQTokenizerError` (a ValueError) that says what was expected.
"""
from __future__ import annotations

import os
import zipfile
from typing import Callable

import numpy as np

from moma_jax import run_dir

FORMAT_VERSION = 1
# Patches per distance block: [2048, 512] float32 is 4 MiB, which stays in cache while
# argmin reads it (measured ~30% faster than 32 MiB blocks).
_CHUNK = 2048


class VQTokenizerError(ValueError):
  """Images, codes or a saved file that do not fit the tokenizer."""


def _check_images(images, image_size: int | None, patch: int, lead: str) -> np.ndarray:
  """uint8 [..., H, W, 3] with H = W (= image_size when given) divisible by patch."""
  images = np.asarray(images)
  ok = (images.dtype == np.uint8 and images.ndim >= 3 and images.shape[-1] == 3 and
        images.shape[-3] == images.shape[-2] and images.shape[-3] % patch == 0 and
        images.shape[-3] > 0 and (image_size is None or images.shape[-3] == image_size))
  if lead == 'N' and images.ndim != 4:
    ok = False
  if not ok:
    side = image_size if image_size is not None else 'H'
    width = image_size if image_size is not None else 'W = H'
    raise VQTokenizerError(
        f'expected images of shape [{lead}, {side}, {width}, 3] uint8 (sides divisible '
        f'by the patch size {patch}), got shape {images.shape} {images.dtype}')
  return images


def _to_patches(images: np.ndarray, patch: int) -> np.ndarray:
  """uint8 [..., H, W, 3] -> uint8 [..., n, D], patches in raster order."""
  *lead, h, w, c = images.shape
  g_h, g_w = h // patch, w // patch
  x = images.reshape(*lead, g_h, patch, g_w, patch, c)
  k = len(lead)
  x = x.transpose(*range(k), k, k + 2, k + 1, k + 3, k + 4)    # [..., gh, gw, p, p, 3]
  return x.reshape(*lead, g_h * g_w, patch * patch * c)


def _from_patches(x: np.ndarray, patch: int) -> np.ndarray:
  """float32 [..., n, D] in [0, 1] -> uint8 [..., H, W, 3] (n a square number)."""
  *lead, n, _ = x.shape
  g = int(round(np.sqrt(n)))
  k = len(lead)
  x = x.reshape(*lead, g, g, patch, patch, 3)
  x = x.transpose(*range(k), k, k + 2, k + 1, k + 3, k + 4)    # [..., g, p, g, p, 3]
  x = x.reshape(*lead, g * patch, g * patch, 3)
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _nearest(x: np.ndarray, centres: np.ndarray, x_sq: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [M] nearest centre, float32 [M] squared distance) for x [M, D].

  ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 as one float32 matmul per block: far faster
  than differences, and rounding only matters for near-ties, which are harmless here.
  """
  if x_sq is None:
    x_sq = np.einsum('md,md->m', x, x)
  c_sq = np.einsum('kd,kd->k', centres, centres)
  labels = np.empty(len(x), np.int32)
  dist = np.empty(len(x), np.float32)
  for s in range(0, len(x), _CHUNK):
    d = x[s:s + _CHUNK] @ centres.T
    d *= -2.0
    d += c_sq
    labels[s:s + _CHUNK] = j = np.argmin(d, axis=1)
    dist[s:s + _CHUNK] = d[np.arange(len(j)), j] + x_sq[s:s + _CHUNK]
  return labels, np.maximum(dist, 0.0)


def _kmeans_pp(x: np.ndarray, x_sq: np.ndarray, w: np.ndarray, k: int,
               rng: np.random.Generator) -> np.ndarray:
  """k-means++ start over weighted points: each centre drawn with probability
  proportional to weight times squared distance to the nearest centre so far (a
  spread-out start needs fewer Lloyd steps)."""
  centres = np.empty((k, x.shape[1]), np.float32)
  p = np.cumsum(w, dtype=np.float64)
  centres[0] = x[min(int(np.searchsorted(p, rng.random() * p[-1], side='right')), len(x) - 1)]
  best = np.maximum(x_sq - 2.0 * (x @ centres[0]) + centres[0] @ centres[0], 0.0)
  for i in range(1, k):
    p = np.cumsum(w * best, dtype=np.float64)
    if p[-1] > 0:
      j = min(int(np.searchsorted(p, rng.random() * p[-1], side='right')), len(x) - 1)
    else:       # every point already is a centre: fewer distinct patches than k
      j = int(rng.integers(len(x)))
    centres[i] = x[j]
    d = np.maximum(x_sq - 2.0 * (x @ centres[i]) + centres[i] @ centres[i], 0.0)
    np.minimum(best, d, out=best)
  return centres


def _update(x: np.ndarray, w: np.ndarray, labels: np.ndarray, dist: np.ndarray,
            centres: np.ndarray) -> np.ndarray:
  """Lloyd's update: every centre the weighted mean of its points [K, D]; empty
  clusters move onto the points farthest from their centres (distinct, farthest first)."""
  k = len(centres)
  counts = np.bincount(labels, weights=w, minlength=k)
  full = np.flatnonzero(counts > 0)
  # Points sorted by cluster, then one float64 segment sum per cluster: deterministic,
  # and without a [M, K] one-hot (several times faster than a bincount per coordinate).
  order = np.argsort(labels, kind='stable')
  weighted = x[order].astype(np.float64) * w[order, None]
  sums = np.add.reduceat(weighted, np.searchsorted(labels[order], full), axis=0)
  new = centres.copy()
  new[full] = (sums / counts[full, None]).astype(np.float32)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    far = np.argsort(-dist, kind='stable')[:empty.size]
    far = far[dist[far] > 0]      # a point on its centre already: leave the rest unused
    new[empty[:far.size]] = x[far]
  return new


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distinct rows [U, D] in sorted order, their counts [U]) of uint8 x [M, D]."""
  x = np.ascontiguousarray(x)
  rows = x.view(np.dtype((np.void, x.shape[1]))).ravel()   # one bytes key per row
  keys, counts = np.unique(rows, return_counts=True)
  return keys.view(np.uint8).reshape(-1, x.shape[1]), counts


class VQTokenizer:
  """Patch-wise vector quantizer; local ids in [0, vocab_size)."""

  def __init__(self, codebook: np.ndarray, image_size: int = 32, patch: int = 4):
    codebook = np.asarray(codebook, np.float32)
    if image_size <= 0 or patch <= 0 or image_size % patch:
      raise VQTokenizerError(f'image_size {image_size} must be a positive multiple of the '
                             f'patch size {patch}')
    if codebook.ndim != 2 or codebook.shape[0] == 0 or codebook.shape[1] != patch * patch * 3:
      raise VQTokenizerError(f'expected a codebook of shape [K, {patch * patch * 3}] for '
                             f'{patch}x{patch} RGB patches, got {codebook.shape}')
    self.codebook = codebook
    self.image_size = int(image_size)
    self.patch = int(patch)

  @property
  def vocab_size(self) -> int:
    return self.codebook.shape[0]

  @property
  def codes_per_image(self) -> int:
    return (self.image_size // self.patch) ** 2

  def __repr__(self) -> str:
    return (f'VQTokenizer(K={self.vocab_size}, image_size={self.image_size}, '
            f'patch={self.patch})')

  # --------------------------------------------------------------------------------
  # Fitting
  # --------------------------------------------------------------------------------
  @classmethod
  def fit(cls, images: np.ndarray, codebook_size: int = 512, patch: int = 4, seed: int = 0,
          iters: int = 30, max_patches: int = 65_536, tol: float = 1e-3,
          progress: Callable[[int, float], None] | None = None) -> 'VQTokenizer':
    """Learns a codebook from uint8 [N, H, W, 3] images.

    Lloyd's k-means over at most `max_patches` patches (a seeded subsample), stopping
    after `iters` steps, when no patch changes cluster, or when the mean squared error
    improves by less than a relative `tol`. A cluster that loses all its patches is
    moved onto the patch farthest from its centre (deterministic, and it lowers the
    error most). `progress(step, mse)` is called after every step when given.
    """
    if min(codebook_size, patch, max_patches) <= 0:
      raise VQTokenizerError(f'codebook_size, patch and max_patches must be positive, got '
                             f'{codebook_size}, {patch} and {max_patches}')
    images = _check_images(images, None, patch, 'N')
    x = _to_patches(images, patch).reshape(-1, patch * patch * 3)
    rng = np.random.default_rng(seed)
    if len(x) > max_patches:
      x = x[np.sort(rng.choice(len(x), max_patches, replace=False))]
    if len(x) < codebook_size:
      raise VQTokenizerError(f'{len(x)} patches cannot fit {codebook_size} codebook entries;'
                             ' pass more images or a smaller codebook_size')
    # Flat backgrounds repeat the same patch many times: k-means over distinct patches
    # weighted by their counts is the same problem, often several times smaller.
    x, w = _unique_rows(x)
    x, w = x.astype(np.float32) / 255.0, w.astype(np.float64)
    x_sq = np.einsum('md,md->m', x, x)
    centres = _kmeans_pp(x, x_sq, w, codebook_size, rng)
    labels, prev_mse = None, np.inf
    for step in range(iters):
      new_labels, dist = _nearest(x, centres, x_sq)
      mse = float(w @ dist) / w.sum() / x.shape[1]
      if progress is not None:
        progress(step, mse)
      if labels is not None and np.array_equal(new_labels, labels):
        break
      labels = new_labels
      centres = _update(x, w, labels, dist, centres)
      if prev_mse - mse <= tol * mse:
        break
      prev_mse = mse
    return cls(centres, image_size=images.shape[1], patch=patch)

  # --------------------------------------------------------------------------------
  # Encoding and decoding
  # --------------------------------------------------------------------------------
  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> int32 [..., n]: nearest codebook entry of each patch."""
    images = _check_images(images, self.image_size, self.patch, '...')
    x = _to_patches(images, self.patch)
    lead = x.shape[:-2]
    x = x.reshape(-1, x.shape[-1]).astype(np.float32) / 255.0
    labels, _ = _nearest(x, self.codebook)
    return labels.reshape(*lead, self.codes_per_image)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """int [..., n] local ids -> uint8 [..., H, W, 3]: every patch its codebook entry."""
    codes = np.asarray(codes)
    n = self.codes_per_image
    if codes.ndim < 1 or codes.shape[-1] != n or not np.issubdtype(codes.dtype, np.integer):
      raise VQTokenizerError(f'expected integer codes of shape [..., {n}], got shape '
                             f'{codes.shape} {codes.dtype}')
    if codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
      raise VQTokenizerError(f'codes must lie in [0, {self.vocab_size}), got '
                             f'[{codes.min()}, {codes.max()}]')
    return _from_patches(self.codebook[codes], self.patch)

  # --------------------------------------------------------------------------------
  # Files
  # --------------------------------------------------------------------------------
  def save(self, path: str) -> None:
    """Writes codebook and metadata to `path` (.npz), atomically."""
    with run_dir.atomic_path(path) as tmp, open(tmp, 'wb') as f:
      # A file object, not a name: np.savez would append '.npz' to a name.
      np.savez(f, codebook=self.codebook, image_size=self.image_size, patch=self.patch,
               version=FORMAT_VERSION)

  @classmethod
  def load(cls, path: str) -> 'VQTokenizer':
    """The tokenizer saved at `path`; VQTokenizerError naming it if missing or corrupt."""
    if not os.path.isfile(path):
      raise VQTokenizerError(f'no VQ tokenizer file at {path}')
    try:
      with np.load(path, allow_pickle=False) as f:
        version = int(f['version'])
        codebook, image_size, patch = f['codebook'], int(f['image_size']), int(f['patch'])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise VQTokenizerError(f'{path} is not a readable VQ tokenizer file '
                             f'({type(e).__name__}: {e})') from e
    if version != FORMAT_VERSION:
      raise VQTokenizerError(f'{path} has format version {version}, expected {FORMAT_VERSION}')
    try:
      return cls(codebook, image_size=image_size, patch=patch)
    except VQTokenizerError as e:
      raise VQTokenizerError(f'{path}: {e}') from e

