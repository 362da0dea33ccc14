"""moma_digits: scikit-learn's bundled handwritten digits as 32x32 captioned images.

`sklearn.datasets.load_digits()` ships 1797 greyscale 8x8 digits (ink 0..16) inside the
package, so nothing is downloaded. Each is upscaled bilinearly to 32x32 and drawn as
dark ink on pastel paper (ink and paper colours drawn per image), with a caption that
names the digit in one of several wordings. A seeded permutation puts 10% of the
images in `validation`; the seed also fixes colours and wordings.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from moma_jax.data.embedded import image_text

WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
TEMPLATES = (
    'a handwritten {word}',
    'the digit {n} written by hand',
    'number {word}, handwritten in ink',
    'a hand-drawn {word}',
    'the number {word} written by hand',
    'a scanned handwritten digit: {n}',
    '{word} written in pen',
    'an image of the handwritten digit {word}',
    'a handwritten {n} on coloured paper',
)
VALIDATION_FRACTION = 0.1
SIZE = 32


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  seed: int = 0


def make_config(seed: int = 0) -> DigitsConfig:
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  return DigitsConfig(name=f'seed{seed}', seed=int(seed))


def load() -> tuple[np.ndarray, np.ndarray]:
  """(float [N, 8, 8] ink in [0, 1], int [N] labels) from scikit-learn's copy."""
  # Imported here: scikit-learn takes seconds to import and only a build needs it.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def upscale(images: np.ndarray, size: int = SIZE) -> np.ndarray:
  """Bilinear resize of [N, h, w] to [N, size, size], pixel centres aligned."""
  def axis(n_in):
    pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)
  y0, y1, fy = axis(images.shape[1])
  x0, x1, fx = axis(images.shape[2])
  rows = images[:, y0] * (1 - fy)[:, None] + images[:, y1] * fy[:, None]
  return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def render(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 [32, 32, 3]: dark ink (alpha `ink` [32, 32]) on a pastel sheet."""
  paper = rng.integers(200, 256, size=3).astype(np.float32)
  pen = rng.integers(0, 70, size=3).astype(np.float32)
  a = ink[..., None]
  return np.round(paper * (1 - a) + pen * a).astype(np.uint8)


def caption(label: int, rng: np.random.Generator) -> str:
  return str(rng.choice(TEMPLATES)).format(word=WORDS[label], n=label)


def split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
  """Sorted example indices of each split: a seeded 90/10 permutation."""
  order = np.random.default_rng([seed, 1]).permutation(n)
  k = int(round(n * VALIDATION_FRACTION))
  return {'train': np.sort(order[k:]), 'validation': np.sort(order[:k])}


def examples(seed: int = 0) -> dict[str, list[tuple[int, np.ndarray, str, int]]]:
  """split -> [(index, image, caption, label)] for every image of scikit-learn's set."""
  images, labels = load()
  big = upscale(images)
  made = []
  for i in range(len(images)):
    rng = np.random.default_rng([seed, 0, i])
    made.append((i, render(big[i], rng), caption(int(labels[i]), rng), int(labels[i])))
  return {split: [made[i] for i in idx]
          for split, idx in split_indices(len(images), seed).items()}


class MomaDigits(image_text.ImageTextBuilder):
  """Handwritten digits 0-9, 32x32 RGB, with English captions naming the digit."""

  # Bump when the rendering or the captions change, so stale caches are not reused.
  VERSION = tfds.core.Version('1.0.0')
  DESCRIPTION = ('scikit-learn handwritten digits (UCI optical recognition set), '
                 'upscaled to 32x32 RGB, with captions naming the digit.')
  BUILDER_CONFIGS = [make_config()]

  # The options `datasets.prepare` accepts: a config named after their values.
  make_config = staticmethod(make_config)

  def _split_generators(self, dl_manager):
    del dl_manager  # bundled with scikit-learn
    made = examples(self.builder_config.seed)
    return {split: self._generate_examples(rows) for split, rows in made.items()}

  def _generate_examples(self, rows):
    for index, image, text, _ in rows:
      yield index, {'image': image, 'caption': text}
