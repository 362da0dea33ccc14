"""A researcher's own data as a TFDS dataset the pipeline reads by name.

Two small datasets show the two supported example layouts:
  my_captions: raw fields, {'caption': Text, 'image': uint8 [32, 32, 3]}, tokenized by
               the configured text and VQ image tokenizers;
  my_tokens:   pre-tokenized, {'tokens': int32 [T], 'modality': int8 [T]} in the
               unified vocabulary (ids checked against it when read).
Build them into a data directory, then name one in `data.name`:

  python examples/my_corpus.py /tmp/my_data
  moma-data preview --config experiments/quickstart.py --config.data.name=my_captions \\
      --config.data.data_dir=/tmp/my_data --out my_captions.png

The directory must also hold (or be able to build) the embedded image datasets the VQ
tokenizer is fitted on; it is built once and cached there.
"""
import sys

import numpy as np
import tensorflow_datasets as tfds

COLORS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 70, 220)}


def gradient(rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """A left-to-right blend of two colours, and its caption."""
  a, b = rng.choice(list(COLORS), 2, replace=False)
  t = np.linspace(0, 1, 32)[None, :, None]
  image = (1 - t) * np.array(COLORS[a]) + t * np.array(COLORS[b])
  return np.broadcast_to(image, (32, 32, 3)).astype(np.uint8), f'{a} fading into {b}'


class MyCaptions(tfds.core.GeneratorBasedBuilder):
  """Colour gradients with captions (raw fields)."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # a builder outside a TFDS source tree has no checksums file

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'caption': tfds.features.Text(),
        'image': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(200, 0),
            'validation': self._generate_examples(20, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
      image, caption = gradient(rng)
      yield i, {'caption': caption, 'image': image}


class MyTokens(tfds.core.GeneratorBasedBuilder):
  """Pre-tokenized documents: <bos> byte-level text <eos> in the default vocabulary."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),
        'modality': tfds.features.Tensor(shape=(None,), dtype=np.int8)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(100), 'validation': self._generate_examples(10)}

  def _generate_examples(self, count):
    bos, eos, text_start = 1, 2, 5        # moma_jax.data.vocab: 5 specials, then bytes
    for i in range(count):
      body = np.frombuffer(f'document number {i}'.encode(), np.uint8).astype(np.int32)
      tokens = np.concatenate([[bos], body + text_start, [eos]]).astype(np.int32)
      yield i, {'tokens': tokens, 'modality': np.zeros_like(tokens, np.int8)}


def build(data_dir: str) -> None:
  for builder in (MyCaptions, MyTokens):
    builder(data_dir=data_dir, file_format='array_record').download_and_prepare()


if __name__ == '__main__':
  build(sys.argv[1] if len(sys.argv) > 1 else '/tmp/my_data')
