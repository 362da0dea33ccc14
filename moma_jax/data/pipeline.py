"""The grain input pipeline: documents -> packed rows -> global batches.

Batches (all [B, L]): tokens int32, modality int8, segment_ids int32 (0 = padding),
positions int32 (restarting at every document, and at a document's continuation in the
next row), loss_mask int32. B is the global batch, L = data.seq_len.

How rows are made, and why:
  * Documents of each dataset are shuffled per epoch (seeded) and mixed by weight.
  * Row r of every global batch is its own stream: documents r, r + B, r + 2B, ... of
    the mixed order, concatenated and split into rows of L tokens (documents longer
    than a row continue in the stream's next row; segments keep documents apart).
  * So a process that owns rows [p*B/P, (p+1)*B/P) reads only their documents, and the
    rows of P processes, concatenated in process order, are exactly the rows one
    process would make: batches do not depend on the number of processes.
  * `TrainIterator.get_state()` is the position of every row stream; `set_state`
    resumes it exactly.
Evaluation reads every dataset's validation split once, mixed by the same weights and
packed into rows the same way (`mixed_eval_batches`), so that its routing groups hold
what training's hold; each token carries its dataset. Every process makes all rows
(splits are small) so that all processes agree on the number of batches.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import grain
import grain.experimental as grain_exp
import ml_collections
import numpy as np

from moma_jax import configs
from moma_jax.data import datasets
from moma_jax.data import documents as docs_lib
from moma_jax.data.image_tokenizer import VQTokenizer
from moma_jax.data.image_tokenizer import VQTokenizerError
from moma_jax.data.text_tokenizer import make_text_tokenizer
from moma_jax.data.text_tokenizer import TokenizerError
from moma_jax.data import vocab as vocab_lib
from moma_jax import usage

DEFAULT_DATA_DIR = os.path.join('~', '.cache', 'moma_jax', 'data')
FEATURES = ('tokens', 'modality')
# The evaluation batches also say which dataset of the mixture each token came from.
DATASET = 'dataset'
MIXED_FEATURES = (*FEATURES, DATASET)
# What bad data input raises (a missing dataset, an unreadable tokenizer, ...): the
# command-line tools report these as one line and exit code 2.
DATA_ERRORS = (datasets.DatasetError, docs_lib.DocumentError, vocab_lib.VocabularyError,
               TokenizerError, VQTokenizerError)


def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or DEFAULT_DATA_DIR)


# ----------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------
def load_tokenizers(config: ml_collections.ConfigDict) -> docs_lib.Tokenizers:
  """One tokenizer for each of `model.modalities` (`TOKENIZERS`; the VQ image
  tokenizer is fitted once and cached in the data directory) and the vocabulary they
  make, its ranges in the config's order; checks it fits `model.vocab_size`."""
  modalities = tuple(config.model.modalities)
  unknown = [m for m in modalities if m not in TOKENIZERS]
  if unknown:
    raise configs.ConfigError('model.modalities', f'no tokenizer for {unknown[0]!r}: the '
                              f'data pipeline reads {", ".join(map(repr, TOKENIZERS))}')
  by_modality = {m: TOKENIZERS[m](config) for m in modalities}
  vocab = vocab_lib.Vocabulary(modalities, tuple(t.vocab_size for t in by_modality.values()))
  if vocab.size > config.model.vocab_size:
    raise configs.ConfigError('model.vocab_size', f'{config.model.vocab_size} is smaller '
                              f'than the data vocabulary ({vocab.size} ids)')
  return docs_lib.Tokenizers(vocab, by_modality)


def _text_tokenizer(config):
  return make_text_tokenizer(config.data.text_tokenizer)


def _vq_tokenizer(config) -> VQTokenizer:
  vq = config.data.vq
  # Named after the images it is fitted on, so mixtures of other image datasets never
  # share a codebook by accident.
  names = '+'.join(_fit_datasets(config))
  stem = os.path.join(data_dir(config), 'vq', f'vq_k{vq.codebook_size}_p{vq.patch}_'
                      f's{vq.seed}_n{vq.fit_images}')
  path = f'{stem}_{names}.npz'
  if os.path.exists(path):
    return VQTokenizer.load(path)
  # Data directories made before codebooks were named after their images hold one
  # codebook for every mixture: runs trained on it keep reading it.
  if os.path.exists(f'{stem}.npz'):
    return VQTokenizer.load(f'{stem}.npz')
  images = _fit_images(config, vq.fit_images, vq.seed)
  tok = VQTokenizer.fit(images, codebook_size=vq.codebook_size, patch=vq.patch, seed=vq.seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(path)
  return tok


# The tokenizer each modality is read with, by the modality's name in `model.modalities`:
# a run may use any of them, in any order. Documents (moma_jax/data/documents.py) ask for
# the modalities their examples hold.
TOKENIZERS = {'text': _text_tokenizer, 'image': _vq_tokenizer}


def _fit_datasets(config) -> list[str]:
  """The image datasets the codebook is fitted on: those in use, in mixture order (the
  embedded image datasets when the mixture has none)."""
  names = [n for n, _ in configs.mixture(config.data) if datasets.KIND.get(n) == 'image_text']
  names = names or [n for n, k in datasets.KIND.items() if k == 'image_text']
  return list(dict.fromkeys(names))


def _fit_images(config, count: int, seed: int) -> np.ndarray:
  """Up to `count` training images, drawn evenly from `_fit_datasets`. Read from each
  dataset at its default size (not `data.options`), so that a larger build of the same
  dataset fits the same codebook."""
  names = _fit_datasets(config)
  rng = np.random.default_rng(seed)
  images = []
  for name in names:
    src = datasets.data_source(name, data_dir(config), 'train')
    take = min(len(src), -(-count // len(names)))
    images += [np.asarray(src[int(i)]['image']) for i in rng.choice(len(src), take, replace=False)]
  return np.stack(images)


# ----------------------------------------------------------------------------------
# Documents of one dataset split
# ----------------------------------------------------------------------------------
class DatasetDocuments(Sequence):
  """Random access to the documents of one dataset split: docs[d] -> tokens, modality."""

  def __init__(self, config: ml_collections.ConfigDict, name: str, split: str,
               tok: docs_lib.Tokenizers):
    self.name, self.split, self.tok = name, split, tok
    self.data_dir = data_dir(config)
    self.source = datasets.data_source(name, self.data_dir, split,
                                       **configs.dataset_options(config.data).get(name, {}))
    self.plan = None
    if datasets.KIND.get(name) == 'image_text':
      self.plan = docs_lib.plan_documents(len(self.source), config.data.formats,
                                          config.data.images_per_interleaved,
                                          seed=config.data.seed)

  def __len__(self) -> int:
    return len(self.plan) if self.plan is not None else len(self.source)

  def _example(self, i: int) -> dict[str, Any]:
    try:
      return self.source[i]
    except Exception as e:  # pylint: disable=broad-except
      # array_record reports a damaged shard (hash mismatch, truncation) as RuntimeError.
      folder = os.path.join(self.data_dir, self.name)
      raise datasets.DatasetError(
          f'{self.name}/{self.split}: cannot read example {i} '
          f'({usage.first_line(e)}); '
          f'{datasets.rebuild_hint(self.name, folder)}') from e

  def __getitem__(self, d: int) -> dict[str, np.ndarray]:
    if self.plan is None:
      return docs_lib.example_document(self.tok, self._example(d),
                                       f'{self.name}/{self.split} example {d}')
    members = self.plan.members(d)
    where = f'{self.name}/{self.split} example {int(members[0])}'
    return docs_lib.image_text_document(self.tok, [self._example(int(i)) for i in members],
                                        int(self.plan.fmt[d]), where)


# ----------------------------------------------------------------------------------
# Rows and batches
# ----------------------------------------------------------------------------------
def _row_stream(docs: grain.MapDataset, seq_len: int,
                features: Sequence[str] = FEATURES) -> grain.IterDataset:
  """Documents -> rows of seq_len tokens (concatenate, then split)."""
  # Synchronous reads: a thread pool per row stream (grain's default) costs more than
  # making the documents, which is cheap.
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain_exp.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(read), length_struct={f: seq_len for f in features})


def _batch(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  seg = np.stack([r['tokens_segment_ids'] for r in rows]).astype(np.int32)
  batch = {'tokens': np.stack([r['tokens'] for r in rows]).astype(np.int32),
           'modality': np.stack([r['modality'] for r in rows]).astype(np.int8),
           'segment_ids': seg,
           'positions': np.stack([r['tokens_positions'] for r in rows]).astype(np.int32),
           'loss_mask': (seg > 0).astype(np.int32)}
  if DATASET in rows[0]:
    batch[DATASET] = np.stack([r[DATASET] for r in rows]).astype(np.int8)
  return batch


def process_rows(batch_size: int, process_index: int, process_count: int) -> range:
  if batch_size % process_count:
    raise configs.ConfigError('train.batch_size', f'{batch_size} rows do not split over '
                              f'{process_count} processes')
  per = batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


def _from_json(row_state: dict[str, Any]) -> dict[str, Any]:
  """A row stream's state as grain made it, from its JSON round trip (checkpoints).

  grain's concat-then-split state marks "no partial document left over" by slices equal
  to the tuple (-1, -1); JSON gives them back as lists, which never equal it, so the
  restored stream would re-read its next document as a leftover and make another row.
  (It bit every stream whose last row had ended exactly at a document's end.)
  """
  slices = row_state.get('remainder_slices')
  if slices is None:
    return row_state
  return {**row_state, 'remainder_slices': {k: tuple(v) for k, v in slices.items()}}


class TrainIterator(Iterator):
  """This process's rows of every global batch, forever; checkpointable."""

  def __init__(self, streams: Sequence[grain.IterDataset]):
    self._iters = [iter(s) for s in streams]

  def __next__(self) -> dict[str, np.ndarray]:
    return _batch([next(it) for it in self._iters])

  def get_state(self) -> dict[str, Any]:
    return {'rows': [it.get_state() for it in self._iters]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['rows']) != len(self._iters):
      raise ValueError(f'iterator state for {len(state["rows"])} rows, this process has '
                       f'{len(self._iters)}')
    for it, s in zip(self._iters, state['rows']):
      it.set_state(_from_json(s))


def train_iterator(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers,
                   process_index: int = 0, process_count: int = 1,
                   split: str = 'train') -> TrainIterator:
  """Batches of this process's rows of the global batch `train.batch_size`: the
  datasets of the mixture, each shuffled and repeated, mixed by weight. `split` another
  split: the same mixture of that split (e.g. to measure routing on mixed validation
  batches, as training sees them)."""
  parts, weights = [], []
  for k, (name, weight) in enumerate(configs.mixture(config.data)):
    docs = DatasetDocuments(config, name, split, tok)
    parts.append(grain.MapDataset.source(docs).shuffle(seed=config.data.seed + k).repeat())
    weights.append(weight)
  mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
  b = config.train.batch_size
  rows = process_rows(b, process_index, process_count)
  return TrainIterator([_row_stream(mixed[r::b], config.data.seq_len) for r in rows])


def eval_batches(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers, name: str,
                 process_index: int = 0, process_count: int = 1):
  """One pass over `data.eval_split` of dataset `name` alone: this process's rows of
  each global batch; rows past the end of the split are all padding. A diagnostic: its
  routing groups hold one dataset, which training's never do (`mixed_eval_batches`)."""
  docs = grain.MapDataset.source(DatasetDocuments(config, name, config.data.eval_split, tok))
  yield from _one_pass(docs, config, process_index, process_count, FEATURES)


def mixed_eval_batches(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers,
                       process_index: int = 0, process_count: int = 1):
  """The evaluation batches: `data.eval_split` of every dataset, mixed by the mixture's
  weights and packed into rows as training's batches are, so that routing groups hold
  what training's hold. Fixed: every call makes the same batches (each split in its own
  order, no shuffling), ending where the first split (relative to its weight) is used
  up; rows past that are all padding. Each token carries its dataset: `dataset` [B, L]
  int8, the index into `configs.mixture(config.data)`."""
  parts, weights = [], []
  for k, (name, weight) in enumerate(configs.mixture(config.data)):
    docs = grain.MapDataset.source(DatasetDocuments(config, name, config.data.eval_split, tok))
    parts.append(docs.map(functools.partial(_with_dataset, k)))
    weights.append(weight)
  mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
  yield from _one_pass(mixed, config, process_index, process_count, MIXED_FEATURES)


def _with_dataset(k: int, doc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**doc, DATASET: np.full(doc['tokens'].shape, k, np.int8)}


def _one_pass(docs: grain.MapDataset, config: ml_collections.ConfigDict,
              process_index: int, process_count: int, features: Sequence[str]):
  """Global batches of `docs` read once, row r of each batch the r-th row stream (as in
  training); this process's rows of each. Streams that end early give padding rows."""
  b, l = config.train.batch_size, config.data.seq_len
  mine = process_rows(b, process_index, process_count)
  iters = [iter(_row_stream(docs[r::b], l, features)) for r in range(b)]
  empty = {**{f: np.zeros(l, np.int32) for f in features},
           'tokens_segment_ids': np.zeros(l, np.int32), 'tokens_positions': np.zeros(l, np.int32)}
  while True:
    rows = [next(it, None) for it in iters]
    if all(r is None for r in rows):
      return
    yield _batch([rows[r] if rows[r] is not None else empty for r in mine])
