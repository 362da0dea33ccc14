"""Which field two configs first differ on (resuming a run, upcycling from one)."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import ml_collections


def first_difference(a: Mapping[str, Any] | ml_collections.ConfigDict,
                     b: Mapping[str, Any] | ml_collections.ConfigDict,
                     fields: Iterable[str]) -> str | None:
  """The first of `fields` (dotted names; a block compares whole) on which configs `a`
  and `b` (ConfigDicts or their plain dicts) differ, lists and tuples alike; a field
  missing from either differs. None if they agree on all."""
  def value(config, field):
    node = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    for part in field.split('.'):
      if not isinstance(node, Mapping) or part not in node:
        return KeyError
      node = node[part]
    return json.dumps(node.to_dict() if isinstance(node, ml_collections.ConfigDict)
                      else node, sort_keys=True)
  for field in fields:
    before, now = value(a, field), value(b, field)
    if before is KeyError or before != now:
      return field
  return None
