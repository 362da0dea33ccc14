"""Documents: examples of a dataset turned into one mixed-modal token stream each.

A document is `<bos> part ... part <eos>`; a text part is the text tokenizer's ids in the
text range; an image part is `<boi> c_0 ... c_63 <eoi>` with VQ codes in the image range.
Image-text examples become documents in three formats, in proportions set by
`data.formats`: caption then image, image then caption, or several examples
interleaved (caption image caption image ...). A plan fixed by the seed says which
examples form which document, so documents are random-access and every example is
used once per epoch.

Arrays: tokens [T] int32 vocabulary ids, modality [T] int8 (T tokens of a document).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from moma_jax.data import vocab as vocab_lib

FORMATS = ('caption_image', 'image_caption', 'interleaved')


class DocumentError(ValueError):
  """An example that cannot become a document; the message names dataset and index."""


@dataclasses.dataclass(frozen=True)
class Tokenizers:
  """The vocabulary and the tokenizer of each of its modalities, by name.

  A tokenizer has .vocab_size, .encode and .decode: text's maps str <-> int32 [T] local
  ids, image's uint8 [H, W, 3] <-> int32 [n] local codes.
  """
  vocab: vocab_lib.Vocabulary
  by_modality: Mapping[str, Any]

  def of(self, modality: str, where: str = 'an example') -> Any:
    """The tokenizer of `modality`; DocumentError (naming `where`) if the run has no
    such modality."""
    if modality not in self.by_modality:
      raise DocumentError(f'{where}: holds {modality}, which is not among this run\'s '
                          f'model.modalities {tuple(self.by_modality)}')
    return self.by_modality[modality]

  @property
  def text(self) -> Any:
    return self.of('text')

  @property
  def image(self) -> Any:
    return self.of('image')

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image.image_size, self.image.image_size, 3)


@dataclasses.dataclass(frozen=True)
class DocumentPlan:
  """Which examples form document d: example_ids[starts[d]:starts[d + 1]], in `fmt[d]`."""
  fmt: np.ndarray          # [num_docs] int8 index into FORMATS
  starts: np.ndarray       # [num_docs + 1] int64
  example_ids: np.ndarray  # [num_examples] int64, a permutation

  def __len__(self) -> int:
    return int(self.fmt.shape[0])

  def members(self, d: int) -> np.ndarray:
    return self.example_ids[self.starts[d]:self.starts[d + 1]]


def plan_documents(num_examples: int, formats: Sequence[float], per_interleaved: int,
                   seed: int) -> DocumentPlan:
  """Deals a seeded permutation of the examples into documents of the given formats."""
  p = np.asarray(formats, np.float64)
  p = p / p.sum()
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_examples)
  choice = rng.choice(len(FORMATS), size=num_examples, p=p)
  fmt, starts, i = [], [0], 0
  for f in choice:
    if i >= num_examples:
      break
    take = per_interleaved if FORMATS[f] == 'interleaved' else 1
    take = min(take, num_examples - i)
    fmt.append(f)
    i += take
    starts.append(i)
  return DocumentPlan(np.asarray(fmt, np.int8), np.asarray(starts, np.int64), order)


def _text_part(tok: Tokenizers, text: str | bytes, where: str) -> np.ndarray:
  if isinstance(text, bytes):
    text = text.decode('utf-8')
  return tok.vocab.to_global(tok.of('text', where).encode(text), 'text')


def _image_part(tok: Tokenizers, image: np.ndarray, where: str) -> np.ndarray:
  image_tok = tok.of('image', where)
  image = np.asarray(image)
  if image.shape != tok.image_shape or image.dtype != np.uint8:
    raise DocumentError(f'{where}: image of shape {image.shape} {image.dtype}, expected '
                        f'{tok.image_shape} uint8')
  codes = tok.vocab.to_global(image_tok.encode(image), 'image')
  return np.concatenate([[vocab_lib.BOI], codes, [vocab_lib.EOI]]).astype(np.int32)


def _finish(tok: Tokenizers, parts: Sequence[np.ndarray], where: str) -> dict[str, np.ndarray]:
  body = np.concatenate([np.asarray(p, np.int32) for p in parts]) if parts else np.zeros(0, np.int32)
  if body.size == 0:
    raise DocumentError(f'{where}: empty document')
  tokens = np.concatenate([[vocab_lib.BOS], body, [vocab_lib.EOS]]).astype(np.int32)
  return {'tokens': tokens, 'modality': tok.vocab.modality_of(tokens)}


def image_text_document(tok: Tokenizers, examples: Sequence[Mapping[str, Any]], fmt: int,
                        where: str) -> dict[str, np.ndarray]:
  """examples: dicts with 'image' uint8 [H, W, 3] and 'caption'."""
  parts = []
  for ex in examples:
    caption, image = _text_part(tok, ex['caption'], where), _image_part(tok, ex['image'], where)
    if not caption.size:
      raise DocumentError(f'{where}: empty caption')
    pair = [image, caption] if FORMATS[fmt] == 'image_caption' else [caption, image]
    parts.extend(pair)
  return _finish(tok, parts, where)


def text_document(tok: Tokenizers, text: str | bytes, where: str) -> dict[str, np.ndarray]:
  return _finish(tok, [_text_part(tok, text, where)], where)


def pretokenized_document(tok: Tokenizers, tokens: np.ndarray, modality: np.ndarray | None,
                          where: str) -> dict[str, np.ndarray]:
  """A researcher's example with vocabulary ids (and optionally their modality ids)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size == 0:
    raise DocumentError(f'{where}: empty document' if tokens.size == 0 else
                        f'{where}: tokens must be 1-D, got shape {tokens.shape}')
  try:
    tok.vocab.check(tokens, modality, where)
  except vocab_lib.VocabularyError as e:
    raise DocumentError(str(e)) from None
  return {'tokens': tokens.astype(np.int32), 'modality': tok.vocab.modality_of(tokens)}


def example_document(tok: Tokenizers, example: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
  """One example of any supported kind -> one document (image-text: caption first)."""
  if 'tokens' in example:
    return pretokenized_document(tok, example['tokens'], example.get('modality'), where)
  if 'image' in example and 'caption' in example:
    return image_text_document(tok, [example], FORMATS.index('caption_image'), where)
  if 'text' in example:
    return text_document(tok, example['text'], where)
  raise DocumentError(f'{where}: an example needs "tokens", "text", or "image" and '
                      f'"caption"; it has {sorted(example)}')
