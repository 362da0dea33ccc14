"""Text tokenizers: UTF-8 bytes, or a SentencePiece model; both give local ids.

Shapes (axis legend): T tokens of one text.
  encode   str             -> int32 [T]   local ids in [0, vocab_size)
  decode   int [T]         -> str
The vocabulary (`vocab.py`) shifts local ids into the text range; the tokenizers add no
special tokens of their own (documents add <bos>/<eos>).

  make_text_tokenizer('bytes')          ByteTokenizer: 256 ids, exact for any text
  make_text_tokenizer('path/x.model')   SentencePieceTokenizer over that model file
  train_sentencepiece(texts, prefix, vocab_size)   trains one, writes prefix.model

Every failure is a `TokenizerError` (a ValueError) that names the file or the ids.
"""
from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np

from moma_jax import run_dir

BYTES = 'bytes'


class TokenizerError(ValueError):
  """A tokenizer file that cannot be used, or ids a tokenizer does not have."""


def _check_ids(ids, vocab_size: int) -> np.ndarray:
  """int [T] ids in [0, vocab_size), else TokenizerError."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise TokenizerError(f'expected integer ids of shape [T], got shape {ids.shape} '
                         f'{ids.dtype}')
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise TokenizerError(f'text ids must lie in [0, {vocab_size}), got '
                         f'[{ids.min()}, {ids.max()}]')
  return ids


class ByteTokenizer:
  """UTF-8 bytes as ids: no training, no unknown text, 256 ids."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [T], T = len(text.encode('utf-8'))."""
    try:
      data = text.encode('utf-8')
    except UnicodeEncodeError as e:       # lone surrogates are not valid text
      raise TokenizerError(f'text is not valid Unicode: {e}') from e
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """int [T] -> str. A character cut by the ends of `ids` (a row of a packed stream, a
    model's sample) or bytes that are not UTF-8 become U+FFFD, never an error: whatever
    reads text back (previews, generation, reports) shows what it can."""
    ids = _check_ids(ids, self.vocab_size)
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece model's pieces as ids.

  decode(encode(text)) == text only for text the model covers: characters it never saw
  become one unknown id (decoded as ' \u2047 ') unless it was trained with byte
  fallback, and its normalization rule (NFKC unless trained with 'identity', as
  `train_sentencepiece` does) and whitespace handling may change the text.
  """

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top  # only this class
    self.model_path = model_path
    if not os.path.isfile(model_path):
      raise TokenizerError(f'no SentencePiece model file at {model_path}')
    with open(model_path, 'rb') as f:
      proto = f.read()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise TokenizerError(f'{model_path} is not a SentencePiece model ({e})') from e
    if self._sp.get_piece_size() <= 0:
      raise TokenizerError(f'{model_path} is not a SentencePiece model (no pieces)')
    self._proto = proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [T] piece ids."""
    return np.asarray(self._sp.encode(text, out_type=int), np.int32).reshape(-1)

  def decode(self, ids) -> str:
    """int [T] -> str (see the class docstring for when this is not the original)."""
    ids = _check_ids(ids, self.vocab_size)
    return self._sp.decode([int(i) for i in ids])

  # Pickled as the model's bytes, so that data-loading worker processes get a copy
  # without reading the file again (the processor itself is a C++ object).
  def __getstate__(self):
    return {'model_path': self.model_path, 'proto': self._proto}

  def __setstate__(self, state):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_path, self._proto = state['model_path'], state['proto']
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})'


def make_text_tokenizer(spec: str) -> ByteTokenizer | SentencePieceTokenizer:
  """'bytes' -> ByteTokenizer; anything else is the path of a SentencePiece .model."""
  if spec == BYTES:
    return ByteTokenizer()
  return SentencePieceTokenizer(os.path.expanduser(spec))


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        seed: int = 0, model_type: str = 'unigram',
                        byte_fallback: bool = False, character_coverage: float = 0.9995,
                        **options) -> str:
  """Trains a SentencePiece model on `texts`, writes `model_prefix + '.model'`
  atomically and returns that path. `options` go to SentencePieceTrainer.train.

  Settings for an exact, reproducible tokenizer: 'identity' normalization and kept
  whitespace (so decode gives back covered text exactly), no <s>/</s> pieces (documents
  have their own), one thread, input in the given order, the global SentencePiece
  random seed set to `seed`. Each text is one training sentence, kept whole (newlines
  included) however long. `byte_fallback=True` makes every text round-trip exactly
  (unseen characters become UTF-8 byte pieces) but needs vocab_size > 256 plus the
  characters kept by `character_coverage`.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  path = model_prefix + '.model'
  settings = dict(
      vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
      character_coverage=character_coverage, normalization_rule_name='identity',
      remove_extra_whitespaces=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
      max_sentence_length=1 << 30, minloglevel=2)
  settings.update(options)
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   **settings)
  except RuntimeError as e:
    raise TokenizerError(f'training {path} failed: {e}') from e
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Never a half-written model under the final name.
  with run_dir.atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(model.getvalue())
  return path
