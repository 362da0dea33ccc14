"""Datasets by name: the embedded ones, built on first use, and prepared TFDS datasets.

  EMBEDDED        name -> TFDS builder class of a dataset built from bundled data
  KIND            name -> 'image_text' ({'image', 'caption'}) | 'text' ({'text'})
  prepare(name, data_dir, **kwargs)       the builder, built into data_dir if absent
  data_source(name, data_dir, split)      random-access source (len, [i]; grain-ready)
  build_all(data_dir)                     build every embedded dataset, seconds each

Embedded datasets are written as array_record under data_dir/<name>/<config>/<version>/
and reused afterwards. TFDS writes into an `incomplete.*` folder and renames it at the
end, so an interrupted build never looks complete and the next call builds again.
A name that is not embedded is looked up with `tfds.builder(name, data_dir=data_dir)`: a
researcher's own dataset works once prepared there in the array_record format; nothing
is ever downloaded. Every failure is a `DatasetError` that names the dataset.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import time
import uuid
from typing import Any

import tensorflow_datasets as tfds

from moma_jax.data import embedded
from moma_jax import usage

EMBEDDED: dict[str, type] = {
    'moma_digits': embedded.MomaDigits,
    'moma_shapes': embedded.MomaShapes,
    'moma_pydoc': embedded.MomaPydoc,
}
KIND: dict[str, str] = {
    'moma_digits': 'image_text',
    'moma_shapes': 'image_text',
    'moma_pydoc': 'text',
}
FILE_FORMAT = 'array_record'


class DatasetError(ValueError):
  """A dataset that cannot be built or read; the message names the dataset."""


def _expand(data_dir: str | os.PathLike) -> str:
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def _check_writable(name: str, data_dir: str) -> None:
  """Create data_dir and write a probe file, so that a bad path fails before a build."""
  probe = os.path.join(data_dir, f'.write_probe_{os.getpid()}_{uuid.uuid4().hex}')
  try:
    os.makedirs(data_dir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise DatasetError(f'cannot build {name}: data directory {data_dir} is not writable '
                       f'({e.strerror or e}); choose another one (data.data_dir)') from e


class _QuietExpected(logging.Filter):
  """Drops two warnings TFDS logs on every first build: an absent version folder (which
  is what "not built yet" looks like) and a config made from options (deliberate)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ('has no dataset_info.json' in message or
                message.startswith('Using custom data configuration'))


@contextlib.contextmanager
def _quiet_expected_warnings():
  quiet, logger = _QuietExpected(), logging.getLogger('absl')
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _is_prepared(builder) -> bool:
  with _quiet_expected_warnings():
    return builder.is_prepared()


def _embedded_builder(name: str, data_dir: str, kwargs: dict[str, Any]) -> tuple[Any, bool]:
  """(builder, whether it is prepared) of embedded dataset `name` in data_dir."""
  cls = EMBEDDED[name]
  config = None
  if kwargs:
    make_config = getattr(cls, 'make_config', None)
    if make_config is None:
      raise DatasetError(f'{name} takes no options, got {", ".join(sorted(kwargs))}')
    options = ', '.join(inspect.signature(make_config).parameters)
    try:
      config = make_config(**kwargs)
    except TypeError as e:
      raise DatasetError(f'{name}: bad options {sorted(kwargs)}; its options are '
                         f'{options}') from e
    except ValueError as e:
      raise DatasetError(f'{name}: {e}') from e
  try:
    with _quiet_expected_warnings():
      builder = cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT)
      return builder, builder.is_prepared()
  except OSError as e:
    raise DatasetError(f'{name}: cannot use data directory {data_dir}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    # TFDS reads dataset_info.json and features.json here: a damaged one raises
    # protobuf or JSON errors of assorted types.
    folder = os.path.join(data_dir, name)
    raise DatasetError(f'{name}: cannot read its dataset_info.json or features.json under '
                       f'{folder} ({usage.first_line(e, with_type=True)}); '
                       f'{rebuild_hint(name, folder)}') from e


def _tfds_builder(name: str, data_dir: str, kwargs: dict[str, Any]):
  """A prepared, array_record TFDS dataset `name` in data_dir (never downloaded)."""
  known = ', '.join(sorted(EMBEDDED))
  try:
    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  except tfds.core.DatasetNotFoundError as e:
    raise DatasetError(f'unknown dataset {name!r}: not one of the embedded datasets '
                       f'({known}) and no prepared TFDS dataset of that name in '
                       f'{data_dir}') from e
  except Exception as e:  # pylint: disable=broad-except
    # tfds.builder reports bad names, configs and versions with assorted types.
    raise DatasetError(f'dataset {name!r} in {data_dir}: {type(e).__name__}: '
                       f'{str(e)[:500]}') from e
  if not _is_prepared(builder):
    raise DatasetError(f'TFDS dataset {name!r} is not prepared in {data_dir} (embedded '
                       f'datasets: {known}); prepare it there first, e.g. `tfds build '
                       f'{name} --data_dir={data_dir} --file_format={FILE_FORMAT}`')
  formats = {builder.info.file_format, *builder.info.alternative_file_formats}
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise DatasetError(f'TFDS dataset {name!r} in {data_dir} is stored as '
                       f'{builder.info.file_format.value}; random access needs '
                       f'{FILE_FORMAT} (rebuild it with --file_format={FILE_FORMAT})')
  return builder


def prepare(name: str, data_dir: str | os.PathLike, **builder_kwargs):
  """The TFDS builder of dataset `name`, built into data_dir first if it is embedded
  and not there yet. builder_kwargs: the dataset's options (moma_shapes: num_train,
  num_validation, seed; moma_digits: seed), or for a TFDS dataset `tfds.builder`'s
  keyword arguments (config, version). A read-only data_dir is fine once built."""
  if not isinstance(name, str) or not name:
    raise DatasetError(f'dataset name must be a non-empty string, got {name!r}')
  data_dir = _expand(data_dir)
  if name not in EMBEDDED:
    return _tfds_builder(name, data_dir, builder_kwargs)
  if not os.path.isdir(data_dir):
    _check_writable(name, data_dir)
  builder, prepared = _embedded_builder(name, data_dir, builder_kwargs)
  if prepared:
    return builder
  _check_writable(name, data_dir)
  print(f'building {name} into {builder.data_path} ...', file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    # TFDS prints its own banners to stdout; keep stdout for the caller's output.
    with contextlib.redirect_stdout(sys.stderr):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    # Another process building the same dataset may have renamed its copy into place
    # first; then ours fails to rename, and theirs is the one to use.
    again, prepared = _embedded_builder(name, data_dir, builder_kwargs)
    if prepared:
      return again
    raise DatasetError(f'building {name} into {data_dir} failed: '
                       f'{type(e).__name__}: {e}') from e
  print(f'built {name} in {time.perf_counter() - start:.1f}s', file=sys.stderr, flush=True)
  return builder


def splits(builder) -> list[str]:
  return sorted(builder.info.splits)


def rebuild_hint(name: str, folder: str) -> str:
  """What to do about the damaged dataset `name` stored in `folder`."""
  if name in EMBEDDED:
    return f'remove {folder} and rebuild it with `moma-data build --config EXPERIMENT`'
  return f'prepare {name} again (its folder: {folder})'


def split_names(split: str) -> list[str]:
  """The split names in a TFDS split expression: 'train[:10%]+validation' -> both."""
  return [re.match(r'\s*([^\[\s]*)', p).group(1) for p in str(split).split('+')]


def data_source(name: str, data_dir: str | os.PathLike, split: str, **builder_kwargs):
  """Random-access examples of `split` (TFDS slicing such as 'train[:10%]' allowed):
  `len(src)`, `src[i]` -> dict of numpy arrays / bytes; usable as a grain source."""
  builder = prepare(name, data_dir, **builder_kwargs)
  known = splits(builder)
  missing = [p for p in split_names(split) if p not in known]
  if missing:
    raise DatasetError(f'{name} has no split {split!r}; splits: {", ".join(known)}')
  try:
    return builder.as_data_source(split=split)
  except (ValueError, KeyError, AssertionError, NotImplementedError) as e:
    if 'of 0 length' in str(e):    # TFDS's word for a selection without examples
      raise DatasetError(f'{name}: split {split!r} is empty; choose another split or '
                         'dataset') from e
    raise DatasetError(f'{name}: cannot read split {split!r}: {e}') from e


def build_all(data_dir: str | os.PathLike) -> dict[str, float]:
  """Build (or reuse) every embedded dataset at its defaults; name -> seconds taken."""
  times = {}
  for name in EMBEDDED:
    start = time.perf_counter()
    prepare(name, data_dir)
    times[name] = time.perf_counter() - start
  return times
