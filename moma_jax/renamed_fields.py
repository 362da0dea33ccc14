"""Config fields renamed or removed since runs were first saved.

A config that sets an old name (an experiment file, a `--config.*` flag) is refused in
one line naming the new field (`refuse`); a saved run's config.json, written under the
old names, is read under the new ones (`upgrade_saved`).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator, Mapping

# Old dotted name -> the new one.
RENAMED = {
    'model.capacity_factor': 'model.topk_capacity_factor',
    'routing.capacity_factor': 'routing.buffer_factor',
    'routing.ep_capacity_factor': 'routing.ep_buffer_factor',
}
# Old dotted name -> why it went.
REMOVED = {'train.nan_steps': 'the tests inject non-finite losses themselves'}


class RenamedFieldError(ValueError):
  """A config sets a renamed or removed field; the message starts with its name."""

  def __init__(self, field: str, message: str):
    super().__init__(f'{field}: {message}')
    self.field, self.message = field, message


def refuse(fields: Iterable[str]) -> None:
  """RenamedFieldError for the first of `fields` (dotted names) that was renamed or removed."""
  for field in fields:
    if field in RENAMED:
      raise RenamedFieldError(field, f'is now {RENAMED[field]}: set that instead')
    if field in REMOVED:
      raise RenamedFieldError(field, f'was removed ({REMOVED[field]})')


def fields(tree: Mapping[str, Any], prefix: str = '') -> Iterator[str]:
  """The dotted name of every field of a (nested) config or dict."""
  for key, value in tree.items():
    yield prefix + key
    if isinstance(value, Mapping):
      yield from fields(value, f'{prefix}{key}.')


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved run's config (config.json's dict) under today's names: renamed fields
  moved to their new names, removed ones dropped. Returns a new dict."""
  out = copy.deepcopy(saved)
  for old in (*RENAMED, *REMOVED):
    *parents, leaf = old.split('.')
    node = out
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
      continue
    value = node.pop(leaf)
    if old in RENAMED:
      *parents, leaf = RENAMED[old].split('.')
      node = out
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
  return out
