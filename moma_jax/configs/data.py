"""`config.data`: which datasets, mixed how, tokenized how, into rows of what length.

Besides the defaults and the validator, the parsers of the block's two strings:
`mixture` (`data.name` / `data.mixture`) and `dataset_options` (`data.options`).
"""
from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from moma_jax.configs.checks import ConfigError, positive

# Document formats of image-text examples, in `data.formats` order
# (moma_jax/data/documents.py).
NUM_FORMATS = 3


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # A dataset name, or 'mixture' for the weighted `mixture` of several.
      name='mixture',
      mixture='moma_shapes:0.4,moma_digits:0.3,moma_pydoc:0.3',
      # Builder options of embedded datasets, 'name:key=value[:key=value];name2:...',
      # e.g. 'moma_shapes:num_train=100000' for more scenes (built on first use).
      options='',
      seq_len=128,
      data_dir=config_dict.placeholder(str),   # None: ~/.cache/moma_jax/data
      eval_split='validation',
      # Documents made of image-text examples: caption then image, image then caption,
      # several images interleaved with their captions (proportions).
      formats=(0.4, 0.4, 0.2),
      images_per_interleaved=3,
      text_tokenizer='bytes',                  # or a SentencePiece .model path
      vq=ml_collections.ConfigDict(dict(codebook_size=512, patch=4, seed=0,
                                        fit_images=4000)),
      seed=0,
  ))


def validate(d: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """ConfigError for a `config.data` the pipeline cannot read into the model's rows.
  Whether the named datasets exist is checked when they are opened (moma_jax/data/)."""
  positive('data.seq_len', d.seq_len)
  if d.seq_len > model.max_len:
    raise ConfigError('data.seq_len', f'{d.seq_len} exceeds model.max_len={model.max_len}')
  mixture(d)
  dataset_options(d)
  formats = tuple(d.formats or ())
  if (len(formats) != NUM_FORMATS or any(not isinstance(f, (int, float)) or f < 0
                                         for f in formats) or not sum(formats) > 0):
    raise ConfigError('data.formats', f'needs {NUM_FORMATS} proportions >= 0 with a positive '
                      f'sum (caption-image, image-caption, interleaved), got {d.formats!r}')
  positive('data.images_per_interleaved', d.images_per_interleaved)


def mixture(d: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """[(dataset name, weight)] from `data.name` or, for 'mixture', `data.mixture`."""
  if d.name != 'mixture':
    return [(d.name, 1.0)]
  out = []
  for item in (d.mixture or '').split(','):
    name, _, weight = item.strip().partition(':')
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      w = -1.0
    if not name or not w > 0:
      raise ConfigError('data.mixture', f'expected "name:weight,..." with positive '
                        f'weights, got {d.mixture!r}')
    out.append((name, w))
  return out


def dataset_options(d: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
  """{dataset name: builder options} from `data.options`
  ('moma_shapes:num_train=100000:num_validation=400;moma_digits:...'); integer values."""
  out = {}
  for item in (d.options or '').split(';'):
    if not item.strip():
      continue
    name, *pairs = item.strip().split(':')
    opts = {}
    for pair in pairs:
      key, _, value = pair.partition('=')
      if not key.strip() or not re.fullmatch(r'\s*\d+\s*', value):
        raise ConfigError('data.options', f'expected "name:key=integer[:...];...", '
                          f'got {d.options!r}')
      opts[key.strip()] = int(value)
    if not name.strip() or name.strip() in out:
      raise ConfigError('data.options', f'expected one "name:key=integer[:...]" '
                        f'per dataset, got {d.options!r}')
    out[name.strip()] = opts
  return out
