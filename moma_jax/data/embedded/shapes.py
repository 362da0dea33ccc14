"""moma_shapes: procedurally drawn scenes of coloured shapes with compositional captions.

Example i of a split is drawn from a generator seeded with (seed, split, i), so a
dataset of any size is deterministic and a larger one extends a smaller one with the
same seed. The drawing and the caption grammar live in `shapes_drawing`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from moma_jax.data.embedded import image_text
from moma_jax.data.embedded import shapes_drawing

SPLIT_IDS = {'train': 0, 'validation': 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """How many scenes each split holds and the seed they are drawn from."""
  num_train: int = 4000
  num_validation: int = 400
  seed: int = 0


def make_config(num_train: int = 4000, num_validation: int = 400,
                seed: int = 0) -> ShapesConfig:
  """A config named after its values, so different sizes are cached side by side."""
  for field, value, least in (('num_train', num_train, 1),
                              ('num_validation', num_validation, 1), ('seed', seed, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
      raise ValueError(f'{field} must be an integer >= {least}, got {value!r}')
  return ShapesConfig(name=f'train{num_train}_validation{num_validation}_seed{seed}',
                      num_train=int(num_train), num_validation=int(num_validation),
                      seed=int(seed))


def example(seed: int, split: str, index: int
            ) -> tuple[shapes_drawing.Scene, np.ndarray, str]:
  """(scene, uint8 [32, 32, 3] image, caption) of example `index` of `split`."""
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  scene = shapes_drawing.make_scene(rng)
  return scene, shapes_drawing.render(scene), shapes_drawing.caption(scene, rng)


class MomaShapes(image_text.ImageTextBuilder):
  """Scenes of 1-3 coloured shapes on a plain background, with captions."""

  # Bump when the drawing or the captions change, so stale caches are not reused.
  VERSION = tfds.core.Version('1.0.0')
  DESCRIPTION = ('32x32 RGB scenes of 1-3 coloured shapes (circle, square, triangle, '
                 'cross, bar) with captions naming colours, sizes and positions.')
  BUILDER_CONFIGS = [make_config()]

  # The options `datasets.prepare` accepts: a config named after their values.
  make_config = staticmethod(make_config)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'validation': self._generate_examples('validation', c.num_validation)}

  def _generate_examples(self, split: str, count: int):
    seed = self.builder_config.seed
    for i in range(count):
      _, image, text = example(seed, split, i)
      yield i, {'image': image, 'caption': text}
