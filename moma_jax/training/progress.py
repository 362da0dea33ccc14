"""A training run's progress record: what a checkpoint saves besides the arrays.

  step                 training steps done
  train_flops          cumulative training FLOPs: flops.count's per-modality training
                       FLOPs per token times the non-padding target tokens of that modality
  tokens               cumulative non-padding target tokens
  nonfinite_skipped    steps whose update was skipped for a non-finite loss or gradient
  nonfinite_in_a_row   of them, the ones since the last finite step

`Progress.count(step_metrics)` books one step from the few numbers the host reads of it
(its token counts and finite flag) and raises `NonFiniteError` once
`train.max_nonfinite` steps in a row were non-finite.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

# What the host reads of every step; the rest of the metrics only on logged steps.
def counted_keys(modalities: Sequence[str]) -> tuple[str, ...]:
  return ('finite', 'tokens', *(f'tokens/{m}' for m in modalities))


class NonFiniteError(RuntimeError):
  """Too many non-finite losses or gradients in a row: exit code 1."""


@dataclasses.dataclass
class Progress:
  step: int = 0
  train_flops: float = 0.0
  tokens: int = 0
  nonfinite_skipped: int = 0
  nonfinite_in_a_row: int = 0

  @classmethod
  def from_saved(cls, saved: Mapping[str, Any]) -> Progress:
    """From a checkpoint's progress item (other keys, e.g. the data position, ignored)."""
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def count(self, step: int, metrics: Mapping[str, Any],
            train_flops_per_token: Mapping[str, float], max_nonfinite: int) -> None:
    """Books step `step` from its host metrics (`counted_keys`)."""
    self.step = step
    self.tokens += int(metrics['tokens'])
    self.train_flops += sum(flops * int(metrics[f'tokens/{m}'])
                            for m, flops in train_flops_per_token.items())
    if bool(metrics['finite']):
      self.nonfinite_in_a_row = 0
      return
    self.nonfinite_skipped += 1
    self.nonfinite_in_a_row += 1
    if self.nonfinite_in_a_row >= max_nonfinite:
      raise NonFiniteError(
          f'{self.nonfinite_in_a_row} non-finite losses or gradients in a row, the last '
          f'at step {step} ({self.nonfinite_skipped} skipped in all); lower train.lr or '
          'check the data')
