"""The data of a run, checked before anything is written.

`check(config, tok)` opens every dataset of the mixture, on the training and the
evaluation split, and raises a one-line `DatasetError` (or `DocumentError`) that names
the dataset or file and says what to do, for:
  * a `dataset_info.json` or `features.json` that cannot be read (datasets.prepare);
  * features that are none of what the pipeline reads ('tokens', 'text', or 'image' and
    'caption'), or not those of the dataset's kind;
  * an empty split;
  * a shard that is missing, cannot be opened (truncated: no valid footer), or holds
    another number of records than `dataset_info.json` says;
  * a corrupt record: every shard up to FULL_READ_BYTES is read whole (each chunk's
    hash is checked on the way, about a second for the embedded datasets), a larger
    one at SAMPLE_RECORDS spread indices;
  * a bad example: SAMPLE_DOCUMENTS documents per split (the first, the last, seeded
    others) are made into token streams, which checks image shapes, captions and the
    vocabulary range of pre-tokenized ids.
A record that turns out bad later, mid-run, is the same `DatasetError` from
`pipeline.DatasetDocuments`.
"""
from __future__ import annotations

import os

from array_record.python import array_record_module
import ml_collections
import numpy as np

from moma_jax import configs
from moma_jax.data import datasets
from moma_jax.data import documents as docs_lib
from moma_jax.data import pipeline
from moma_jax import usage

FULL_READ_BYTES = 256 << 20
SAMPLE_RECORDS = 64
SAMPLE_DOCUMENTS = 8
# What the pipeline can make documents of (documents.example_document), per kind.
FEATURES = {'image_text': ({'image', 'caption'},), 'text': ({'text'},),
            None: ({'tokens'}, {'text'}, {'image', 'caption'})}


def _check_features(name: str, builder) -> None:
  have = set(builder.info.features.keys())
  wanted = FEATURES[datasets.KIND.get(name)]
  if not any(w <= have for w in wanted):
    raise datasets.DatasetError(
        f'{name} has features {sorted(have)}; the pipeline reads '
        + ' or '.join(str(sorted(w)) for w in wanted) + f' ({builder.data_dir})')


def _check_shards(name: str, split: str, builder) -> None:
  """split: a split's name (the whole split's shards are checked, whatever slice of it
  the run reads)."""
  info = builder.info.splits[split]
  hint = datasets.rebuild_hint(name, builder.data_dir)
  for path, count in zip(info.filepaths, info.shard_lengths):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise datasets.DatasetError(f'{name}: shard {path} is missing; {hint}')
    try:
      reader = array_record_module.ArrayRecordReader(path)
      try:
        if reader.num_records() != count:
          raise datasets.DatasetError(
              f'{name}: shard {path} holds {reader.num_records()} records, its '
              f'dataset_info.json says {count}; {hint}')
        if os.path.getsize(path) <= FULL_READ_BYTES:
          reader.read_all()
        else:
          reader.read(np.linspace(0, count - 1, SAMPLE_RECORDS).astype(int).tolist())
      finally:
        reader.close()
    except datasets.DatasetError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # array_record reports truncation and hash mismatches as RuntimeError / OSError.
      raise datasets.DatasetError(
          f'{name}: shard {path} is corrupt ({usage.first_line(e)}); {hint}') from e


def check(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers,
          splits: tuple[str, ...] | None = None) -> None:
  """Raises DatasetError / DocumentError for bad data of the config's mixture; reads,
  never writes. splits: default the training and the evaluation split."""
  splits = splits or tuple(dict.fromkeys(('train', config.data.eval_split)))
  rng = np.random.default_rng(0)
  for name, _ in configs.mixture(config.data):
    options = configs.dataset_options(config.data).get(name, {})
    builder = datasets.prepare(name, pipeline.data_dir(config), **options)
    _check_features(name, builder)
    for split in splits:
      source = datasets.data_source(name, pipeline.data_dir(config), split, **options)
      if not len(source):
        raise datasets.DatasetError(f'{name}: split {split!r} is empty ({builder.data_dir}); '
                                    'choose another split or dataset')
      for part in datasets.split_names(split):
        _check_shards(name, part, builder)
      docs = pipeline.DatasetDocuments(config, name, split, tok)
      n = len(docs)
      if n == 0:
        raise datasets.DatasetError(f'{name}: split {split!r} makes no documents')
      for d in sorted({0, n - 1, *rng.integers(0, n, SAMPLE_DOCUMENTS - 2).tolist()}):
        docs[int(d)]
