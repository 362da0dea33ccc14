"""The base of the embedded image-caption datasets: uint8 [32, 32, 3] images, captions."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SHAPE = (32, 32, 3)


class ImageTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Features {'image': uint8 [32, 32, 3], 'caption': text}; subclasses set VERSION,
  DESCRIPTION, BUILDER_CONFIGS and generate the examples."""

  DESCRIPTION = ''
  # TFDS looks for a checksums file beside the builder's module through the
  # `importlib_resources` backport, which is not installed; nothing is downloaded, so
  # there is no such file to find.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` looks for metadata files beside the
    # module, which only TFDS's own dataset folders have.
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            'caption': tfds.features.Text(),
        }))
