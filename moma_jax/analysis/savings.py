"""FLOPs savings (eta) of sparse runs against a compute-matched dense run.

  baseline = savings.read_run('runs/dense')
  runs = [savings.read_run('runs/moma_4t4i')]
  rows = savings.compare(baseline, runs, ('text', 'image', 'overall'), ('train', 'eval'))
  # files and figures of the rows: moma_jax/analysis/savings_report.py

eta (docs/design.md §1): for a sparse run's point (training FLOPs C, loss L of modality m),
`eta_m = C_dense(L) / C`, C_dense(L) being the training FLOPs at which the dense run
reaches L. Training and evaluation losses are compared separately (the "source"); the
modality 'overall' is the loss over all tokens (`loss`, `eval/loss`).

How C_dense(L) is read off the dense run's logged points (smoothing in log-FLOPs, an
isotonic dense curve, a power law beyond its range): moma_jax/analysis/loss_curves.py.

Run directories hold `config.json` and `metrics.jsonl` as `moma-train` writes them
(docs/design.md §6); reading never changes them. Nothing here imports JAX.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np

from moma_jax.analysis.loss_curves import DEFAULT_SMOOTH
from moma_jax.analysis.loss_curves import dense_curve
from moma_jax.analysis.loss_curves import eta
from moma_jax.analysis.loss_curves import smooth_loss
from moma_jax import configs
from moma_jax import run_dir

SOURCES = ('train', 'eval')
OVERALL = 'overall'
# eta from the dense power law only up to 2x the dense run's FLOPs; a bound beyond.
MAX_EXTRAPOLATION = 2.0


class InputError(Exception):
  """Runs that cannot be read or compared; reported as one line by moma-compare."""


def loss_key(source: str, modality: str) -> str:
  """The metrics.jsonl key of a loss: 'loss', 'loss/text', 'eval/loss', 'eval/loss/image'."""
  base = 'loss' if source == 'train' else 'eval/loss'
  return base if modality == OVERALL else f'{base}/{modality}'


# ----------------------------------------------------------------------------------------
# Reading runs.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Curve:
  """One loss curve of a run, sorted by FLOPs (P = its logged points)."""
  step: np.ndarray      # [P] int, the training step of each point
  flops: np.ndarray     # [P] float, cumulative training FLOPs, > 0, non-decreasing
  loss: np.ndarray      # [P] float, finite


@dataclasses.dataclass(frozen=True)
class Run:
  """A run directory's loss curves and the config fields the comparison needs."""
  workdir: str
  name: str                                 # label in tables and figures
  modalities: tuple[str, ...]               # config model.modalities
  ffn: str                                  # config model.ffn
  mod_enabled: bool                         # config model.mod.enabled
  curves: dict[tuple[str, str], Curve]      # (source, modality or 'overall') -> Curve

  @property
  def dense(self) -> bool:
    return self.ffn == 'dense' and not self.mod_enabled

  def curve(self, source: str, modality: str) -> Curve:
    if (source, modality) not in self.curves:
      what = 'evaluation' if source == 'eval' else 'training'
      raise InputError(f'{os.path.join(self.workdir, run_dir.METRICS_FILE)} has no {what} rows '
                       f'with {loss_key(source, modality)!r}')
    return self.curves[(source, modality)]


def _read_model_config(workdir: str) -> tuple[tuple[str, ...], str, bool]:
  """(modalities, ffn, mod.enabled) of config.json, today's defaults for missing fields."""
  try:
    saved = run_dir.read_config_json(workdir)
  except run_dir.RunDirError as e:
    raise InputError(str(e)) from e
  model = saved.get('model')
  model = model if isinstance(model, dict) else {}
  defaults = configs.default_config().model
  mod = model.get('mod') if isinstance(model.get('mod'), dict) else {}
  return (tuple(model.get('modalities', defaults.modalities)),
          str(model.get('ffn', defaults.ffn)),
          bool(mod.get('enabled', defaults.mod.enabled)))


def _read_metrics(workdir: str) -> list[dict]:
  """The rows of metrics.jsonl. A cut-off last line (a run still writing) is skipped."""
  path = os.path.join(workdir, run_dir.METRICS_FILE)
  if not os.path.isfile(path):
    raise InputError(f'{workdir} has no {run_dir.METRICS_FILE} (not a training run, or nothing '
                     'logged yet)')
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except ValueError as e:
      if i == len(lines) - 1:
        break
      raise InputError(f'{path}:{i + 1}: not a JSON row ({e})') from e
    if isinstance(row, dict):
      rows.append(row)
  return rows


def _number(value) -> float:
  """A JSON value as a float; NaN for null, text and other non-numbers."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return math.nan


def _curve(rows: Sequence[dict], key: str) -> Curve | None:
  """The points of `rows` with a finite `key` and train_flops > 0 (log axes need it)."""
  step, flops, loss = (np.array([_number(r.get(k)) for r in rows], dtype=np.float64)
                       for k in ('step', 'train_flops', key))
  keep = np.isfinite(flops) & (flops > 0) & np.isfinite(loss)
  if not keep.any():
    return None
  order = np.argsort(flops[keep], kind='stable')
  step = np.nan_to_num(step[keep][order], nan=-1).astype(np.int64)
  return Curve(step, flops[keep][order], loss[keep][order])


def read_run(workdir: str, name: str | None = None) -> Run:
  """The run in `workdir` (config.json + metrics.jsonl); `name` defaults to its basename.

  A row is a training row if it has 'loss', an evaluation row if it has 'eval/loss'.
  Raises InputError for a missing directory or file, or no usable rows.
  """
  if not os.path.isdir(workdir):
    raise InputError(f'no such run directory: {workdir}')
  modalities, ffn, mod_enabled = _read_model_config(workdir)
  rows = _read_metrics(workdir)
  curves = {}
  for source in SOURCES:
    source_rows = [r for r in rows if loss_key(source, OVERALL) in r]
    for modality in (*modalities, OVERALL):
      curve = _curve(source_rows, loss_key(source, modality))
      if curve is not None:
        curves[(source, modality)] = curve
  if not curves:
    raise InputError(f'{os.path.join(workdir, run_dir.METRICS_FILE)} has no usable rows (none with '
                     "a finite 'loss' or 'eval/loss' and train_flops > 0)")
  name = name or os.path.basename(os.path.normpath(workdir))
  return Run(workdir, name, modalities, ffn, mod_enabled, curves)


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Short distinct labels: the shortest path suffixes that tell the directories apart
  ('a/moma', 'b/moma'); a directory given twice gets '#2'."""
  parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in workdirs]
  candidates = [['/'.join(p[-k:]) for p in parts]
                for k in range(1, max(len(p) for p in parts) + 1)]
  # The first (shortest) suffix length that tells apart all directories that differ.
  names = max(candidates, key=lambda names: len(set(names)))
  seen: dict[str, int] = {}
  out = []
  for name in names:
    seen[name] = seen.get(name, 0) + 1
    out.append(name if seen[name] == 1 else f'{name}#{seen[name]}')
  return out


# ----------------------------------------------------------------------------------------
# Comparing runs.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
  """One point of savings.csv."""
  run: str
  modality: str
  source: str           # 'train' | 'eval'
  step: int
  train_flops: float
  loss: float           # the smoothed loss eta is computed from
  eta: float            # a lower bound where `bound`
  extrapolated: bool    # the loss is outside the dense run's measured range
  bound: bool = False   # beyond where the extrapolation is trusted: the true eta is larger


def _check(baseline: Run, runs: Sequence[Run], modalities: Sequence[str],
           sources: Sequence[str]) -> None:
  """InputError unless the baseline is dense and every run has every curve asked for."""
  if not baseline.dense:
    what = (f"model.ffn is {baseline.ffn!r}" if baseline.ffn != 'dense'
            else 'model.mod.enabled is true')
    raise InputError(f'the baseline {baseline.workdir} is not a dense run ({what})')
  for source in sources:
    if source not in SOURCES:
      raise InputError(f'unknown loss source {source!r}; known: {", ".join(SOURCES)}')
  for run in (baseline, *runs):
    known = (*run.modalities, OVERALL)
    for modality in modalities:
      if modality not in known:
        raise InputError(f'unknown modality {modality!r}: {run.workdir} has '
                         f'{", ".join(known)}')
      for source in sources:
        run.curve(source, modality)


def smoothing(source: str, smooth: float | None = None) -> float:
  """The smoothing half-width (decades) for a loss source: `smooth`, else the default."""
  return DEFAULT_SMOOTH[source] if smooth is None else smooth


def compare(baseline: Run, runs: Sequence[Run], modalities: Sequence[str] | None = None,
            sources: Sequence[str] = ('train',), smooth: float | None = None,
            max_extrapolation: float = MAX_EXTRAPOLATION) -> list[Row]:
  """eta at every logged point of every run, per modality and loss source.

  modalities: None = the baseline's, then 'overall'. smooth: the half-width of the
  smoothing window in decades of FLOPs, for every source; None = DEFAULT_SMOOTH.
  max_extrapolation: the dense power law is trusted up to this multiple of the dense
  run's training FLOPs. A loss lower than the dense run reached whose C_dense lies
  beyond that, or that the law never reaches (at or below its asymptote), or with no
  law fitted, gets a lower bound (`Row.bound`): eta > min(C_dense, max_extrapolation *
  C_end) / C, C_end the dense run's last FLOPs (C_end itself where no law was fitted,
  the bound the measured curve alone gives). Rows come ordered by run, source,
  modality and FLOPs. Raises InputError for a baseline that is not dense, a missing
  curve, a run none of whose (smoothed) losses lies within the dense range, or
  max_extrapolation < 1.
  """
  modalities = tuple(modalities or (*baseline.modalities, OVERALL))
  if not max_extrapolation >= 1:
    raise InputError(f'the extrapolation limit must be >= 1 (times the dense run\'s FLOPs), '
                     f'got {max_extrapolation:g}')
  _check(baseline, runs, modalities, sources)
  dense = {(s, m): dense_curve(baseline.curve(s, m).flops, baseline.curve(s, m).loss,
                               smoothing(s, smooth))
           for s in sources for m in modalities}
  rows = []
  for run in runs:
    for source in sources:
      for modality in modalities:
        curve, ref = run.curve(source, modality), dense[(source, modality)]
        loss = smooth_loss(curve.flops, curve.loss, smoothing(source, smooth))
        if not ref.inside(loss).any():
          raise InputError(
              f'{run.name}: no overlapping loss range with the baseline for '
              f'{loss_key(source, modality)!r}: {loss.min():.4g}..{loss.max():.4g} vs '
              f'dense {ref.loss[-1]:.4g}..{ref.loss[0]:.4g}')
        values, extrapolated = eta(ref, curve.flops, loss)
        end = baseline.curve(source, modality).flops[-1]
        c_dense = values * curve.flops
        bound = (loss < ref.loss[-1]) & ~(c_dense <= max_extrapolation * end)
        floor = np.where(np.isnan(c_dense), end, max_extrapolation * end)
        values = np.where(bound, floor / curve.flops, values)
        rows.extend(Row(run.name, modality, source, int(s), float(c), float(l), float(e),
                        bool(x), bool(b))
                    for s, c, l, e, x, b in zip(curve.step, curve.flops, loss, values,
                                                extrapolated, bound))
  return rows


def final_rows(rows: Sequence[Row], measured_only: bool = False
               ) -> dict[tuple[str, str], dict[str, Row]]:
  """(run, source) -> modality -> the row at the run's largest FLOPs, in row order;
  with `measured_only`, the last row whose eta is not extrapolated."""
  out: dict[tuple[str, str], dict[str, Row]] = {}
  for row in rows:
    if measured_only and row.extrapolated:
      continue
    last = out.setdefault((row.run, row.source), {}).get(row.modality)
    if last is None or row.train_flops >= last.train_flops:
      out[(row.run, row.source)][row.modality] = row
  return out
