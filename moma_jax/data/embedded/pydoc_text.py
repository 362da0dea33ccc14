"""moma_pydoc: English documents from the language reference that CPython ships.

`pydoc_data.topics.topics` maps ~80 topics ("assert", "for", "typesbool", ...) to
plain-text sections of the reference manual; it is part of the standard library, so
nothing is downloaded (its content follows the running Python's version). Each topic
is cut into documents of MIN_CHARS..MAX_CHARS characters: paragraphs (box-drawn tables
left out) are packed up to TARGET_CHARS, paragraphs that are too long are split at
sentence, then line, then word boundaries, and a short tail joins the document before
it. Whole topics go to one split: `validation` takes topics in the order of a hash of
their names until it holds about 10% of the text, so the choice stays stable when
topics come and go between Python versions.
"""
from __future__ import annotations

import hashlib
import re

import tensorflow_datasets as tfds

MIN_CHARS, TARGET_CHARS, MAX_CHARS = 200, 1000, 2000
VALIDATION_FRACTION = 0.1
# A line that only underlines a heading ("*****", "=====").
_RULE = re.compile(r'^\s*([*=\-~^#])\1{2,}\s*$')
# Boundaries, coarse to fine; each piece keeps its trailing separator.
_SENTENCE = re.compile(r'(?<=[.!?:])\s+(?=\S)')
_LINE = re.compile(r'(?<=\n)')
_WORD = re.compile(r'(?<=\s)(?=\S)')


def _is_table(paragraph: str) -> bool:
  """A box-drawn table ("+----+", "| a | b |"): mostly punctuation, little English."""
  lines = paragraph.splitlines()
  return sum(ln.lstrip().startswith(('+', '|')) for ln in lines) > len(lines) / 2


def paragraphs(text: str) -> list[str]:
  """Blank-line separated paragraphs; heading underlines and tables removed."""
  lines = [ln.rstrip() for ln in text.splitlines() if not _RULE.match(ln)]
  paras = re.split(r'\n\s*\n', '\n'.join(lines))
  return [p.strip('\n') for p in paras if p.strip() and not _is_table(p)]


def _pieces(text: str, limit: int, splitters=(_SENTENCE, _LINE, _WORD)) -> list[str]:
  """`text` cut at the coarsest boundaries that give pieces of at most `limit` chars."""
  if len(text) <= limit:
    return [text]
  if not splitters:
    return [text[i:i + limit] for i in range(0, len(text), limit)]
  units = [u for u in _split_keep(text, splitters[0]) if u]
  out, current = [], ''
  for unit in units:
    if len(unit) > limit:
      if current:
        out.append(current)
        current = ''
      out += _pieces(unit, limit, splitters[1:])
    elif len(current) + len(unit) > limit:
      out.append(current)
      current = unit
    else:
      current += unit
  if current:
    out.append(current)
  # Keep a line's indentation (code), drop the separators at the ends.
  return [p.strip('\n').rstrip() for p in out if p.strip()]


def _split_keep(text: str, pattern: re.Pattern) -> list[str]:
  """Split after each match of `pattern`, the separator staying with the left part."""
  out, start = [], 0
  for m in pattern.finditer(text):
    out.append(text[start:m.end()])
    start = m.end()
  out.append(text[start:])
  return out


def documents(text: str) -> list[str]:
  """One topic's text as documents of MIN_CHARS..MAX_CHARS characters (a topic shorter
  than MIN_CHARS gives none)."""
  pieces = [p for para in paragraphs(text) for p in _pieces(para, TARGET_CHARS)]
  docs, current = [], ''
  for piece in pieces:
    joined = f'{current}\n\n{piece}' if current else piece
    # Close a document once it is long enough and the next piece would overshoot;
    # below MIN_CHARS always take the piece (at most MIN + TARGET < MAX characters).
    if len(current) >= MIN_CHARS and len(joined) > TARGET_CHARS:
      docs.append(current)
      current = piece
    else:
      current = joined
  if len(current) >= MIN_CHARS or not docs:
    docs.append(current)
  else:
    docs[-1] = f'{docs[-1]}\n\n{current}'     # still below MAX_CHARS
  return [d for d in docs if MIN_CHARS <= len(d) <= MAX_CHARS]


def split_of_topics(topics: dict[str, str]) -> dict[str, str]:
  """topic -> 'train' | 'validation': topics taken in the order of their name hashes
  until the held-out ones hold VALIDATION_FRACTION of the text."""
  def digest(name):
    return hashlib.sha256(name.encode()).hexdigest()
  total, held = sum(len(t) for t in topics.values()), 0
  out = {}
  for topic in sorted(topics, key=digest):
    out[topic] = 'validation' if held < VALIDATION_FRACTION * total else 'train'
    held += len(topics[topic]) if out[topic] == 'validation' else 0
  return out


def load_topics() -> dict[str, str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return dict(topics.topics)


def examples() -> dict[str, list[tuple[str, str]]]:
  """split -> [(key 'topic/k', document)], topics in sorted order."""
  topics = load_topics()
  split = split_of_topics(topics)
  out = {'train': [], 'validation': []}
  for topic in sorted(topics):
    for k, doc in enumerate(documents(topics[topic])):
      out[split[topic]].append((f'{topic}/{k}', doc))
  return out


class MomaPydoc(tfds.core.GeneratorBasedBuilder):
  """Paragraph-level English documents from CPython's bundled reference topics."""

  # Bump when the document cutting changes, so stale caches are not reused.
  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for a checksums file beside the builder's module through the
  # `importlib_resources` backport, which is not installed; nothing is downloaded, so
  # there is no such file to find.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` needs metadata files beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Documents of 200-2000 characters cut from the Python language '
                     'reference topics bundled as pydoc_data.topics.'),
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # part of the standard library
    made = examples()
    return {split: self._generate_examples(rows) for split, rows in made.items()}

  def _generate_examples(self, rows):
    for key, text in rows:
      yield key, {'text': text}
