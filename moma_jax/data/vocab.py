"""The unified vocabulary: special tokens, then one id range per modality.

Layout (ids):
  [0, S)                          special tokens: <pad> <bos> <eos> <boi> <eoi>
  [S, S + n_0)                    modality 0 (text: the text tokenizer's ids)
  [S + n_0, S + n_0 + n_1)        modality 1 (image: VQ codes)
  ...                             one more modality is one more range
A token's modality follows from its id; special tokens belong to modality 0 (text).
<boi>/<eoi> open and close an image's codes; <pad> never appears inside a document.
"""
from __future__ import annotations

import dataclasses
import numpy as np

SPECIALS = ('<pad>', '<bos>', '<eos>', '<boi>', '<eoi>')
PAD, BOS, EOS, BOI, EOI = range(len(SPECIALS))


class VocabularyError(ValueError):
  """Token ids that do not fit the vocabulary."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """modalities: names in config order; sizes: ids of each modality's tokenizer."""
  modalities: tuple[str, ...]
  sizes: tuple[int, ...]

  def __post_init__(self):
    if len(self.modalities) != len(self.sizes):
      raise VocabularyError(f'{len(self.modalities)} modalities but {len(self.sizes)} sizes')
    if any(s <= 0 for s in self.sizes):
      raise VocabularyError(f'modality sizes must be positive, got {self.sizes}')

  @property
  def size(self) -> int:
    """Total ids: specials plus every modality's range."""
    return len(SPECIALS) + sum(self.sizes)

  def start(self, modality: str | int) -> int:
    """First id of a modality's range."""
    i = self._index(modality)
    return len(SPECIALS) + sum(self.sizes[:i])

  def _index(self, modality: str | int) -> int:
    if isinstance(modality, str):
      return self.modalities.index(modality)
    return int(modality)

  def to_global(self, local_ids: np.ndarray, modality: str | int) -> np.ndarray:
    """A tokenizer's ids [...] -> vocabulary ids [...] (int32); checks the range."""
    local_ids = np.asarray(local_ids)
    i = self._index(modality)
    if local_ids.size and (local_ids.min() < 0 or local_ids.max() >= self.sizes[i]):
      raise VocabularyError(f'{self.modalities[i]} ids must lie in [0, {self.sizes[i]}), got '
                            f'[{local_ids.min()}, {local_ids.max()}]')
    return (local_ids + self.start(i)).astype(np.int32)

  def to_local(self, ids: np.ndarray, modality: str | int) -> np.ndarray:
    """Vocabulary ids of one modality [...] -> that tokenizer's ids [...]."""
    return (np.asarray(ids) - self.start(modality)).astype(np.int32)

  def modality_of(self, ids: np.ndarray) -> np.ndarray:
    """Modality index [...] int8 of each id; specials are modality 0 (text)."""
    ids = np.asarray(ids)
    bounds = np.cumsum((len(SPECIALS),) + self.sizes)        # end of each range
    mod = np.searchsorted(bounds, ids, side='right') - 1     # -1 for specials
    return np.maximum(mod, 0).astype(np.int8)

  def check(self, ids: np.ndarray, modality: np.ndarray | None = None, where: str = '') -> None:
    """Raises VocabularyError when ids fall outside the vocabulary or `modality`
    contradicts the id ranges. `where` names the example in the message."""
    ids = np.asarray(ids)
    prefix = f'{where}: ' if where else ''
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise VocabularyError(f'{prefix}token id {int(ids.max() if ids.max() >= self.size else ids.min())}'
                            f' outside the vocabulary [0, {self.size})')
    if modality is not None:
      bad = np.flatnonzero(np.asarray(modality) != self.modality_of(ids))
      if bad.size:
        j = int(bad[0])
        raise VocabularyError(
            f'{prefix}token {j} (id {int(ids.flat[j])}) is '
            f'{self.modalities[self.modality_of(ids.flat[j])]} but marked modality '
            f'{int(np.asarray(modality).flat[j])}')

