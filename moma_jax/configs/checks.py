"""ConfigError and the field checks every block's validator is written with.

A check takes the field's dotted name and its value and raises ConfigError naming the
field, so a command-line tool prints one line.
"""
from __future__ import annotations

from typing import Sequence


class ConfigError(ValueError):
  """An impossible configuration; the message starts with the field's dotted name."""

  def __init__(self, field: str, message: str):
    super().__init__(f'{field}: {message}')
    self.field = field


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def positive(path: str, value) -> None:
  if not _is_int(value) or value <= 0:
    raise ConfigError(path, f'must be a positive integer, got {value!r}')


def at_least_zero(path: str, value) -> None:
  """An integer >= 0 (a count that may be empty)."""
  if not _is_int(value) or value < 0:
    raise ConfigError(path, f'must be an integer >= 0, got {value!r}')


def greater_than_zero(path: str, value, or_none: bool = False) -> None:
  """A number > 0 (None allowed when `or_none`)."""
  if or_none and value is None:
    return
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
    raise ConfigError(path, f'must be > 0{" or None" if or_none else ""}, got {value!r}')


def not_negative(path: str, value) -> None:
  """A number >= 0 (a weight that may be off)."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
    raise ConfigError(path, f'must be >= 0, got {value!r}')


def one_of(path: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ConfigError(path, f'must be one of {", ".join(map(repr, allowed))}, got {value!r}')


def in_unit(path: str, value) -> None:
  """A fraction in (0, 1]."""
  if not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ConfigError(path, f'must be in (0, 1], got {value!r}')
