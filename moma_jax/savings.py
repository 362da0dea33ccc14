"""FLOPs savings (eta) of sparse runs against a compute-matched dense run.

  baseline = savings.read_run('runs/dense')
  runs = [savings.read_run('runs/moma_4t4i')]
  rows = savings.compare(baseline, runs, ('text', 'image', 'overall'), ('train', 'eval'))
  # files and figures of the rows: moma_jax/savings_report.py

eta (DESIGN.md §1): for a sparse run's point (training FLOPs C, loss L of modality m),
`eta_m = C_dense(L) / C`, C_dense(L) being the training FLOPs at which the dense run
reaches L. Training and evaluation losses are compared separately (the "source"); the
modality 'overall' is the loss over all tokens (`loss`, `eval/loss`).

How C_dense(L) is read off the dense run's logged points, and why:
1. Smoothing. Every curve, dense and sparse, is smoothed by a local linear fit of the
   loss against u = ln C over the points within +-`smooth` decades of FLOPs (a boxcar
   window). Defaults: 0.2 decades (a factor 1.58 either side) for training losses, noisy
   per step, and 0.05 for evaluation losses, averaged over a whole eval set. A window in
   log-FLOPs rather than in logged points treats runs with different logging intervals
   alike and averages more points where more were logged (per-step logging puts most
   points at high FLOPs). It also commutes with the shift u -> u + ln(eta): a sparse
   curve that is the dense one shifted by a constant eta is still exactly shifted after
   smoothing, so the smoothing bias cancels in eta. A local *linear* fit, unlike a moving
   average, has no first-order bias at the ends of a run or where the points are
   unevenly spread in u; the bias left, from the curve's bend, is about (b/2)(h^2/3) in
   ln(eta) for a power law with exponent b and a half-width of h nats: under 1% at the
   defaults, and mostly cancelled in eta.
2. Monotone. The smoothed dense curve is made non-increasing by isotonic regression (pool
   adjacent violators), the least-squares non-increasing fit. A running minimum would
   follow the downward noise and so make C_dense, and eta, too small. Each pooled block
   becomes one knot at its mean ln C: a plateau maps to its middle, not its first point.
3. Interpolation. Between knots, ln C_dense is linear in L.
4. Extrapolation. A loss below the dense curve's lowest (or above its highest) knot takes
   its FLOPs from a power law L = a*C^-b + c fitted to the dense points of the last
   `FIT_DECADES` decades of FLOPs (the first rapid drop follows no power law). The fit
   gives the FLOPs *ratio* from the nearest end knot, `C_dense(L) = C_end * C_fit(L) /
   C_fit(L_end)`, so eta is continuous where the measured range ends. Such points are
   marked extrapolated; a loss at or below the fit's asymptote c has eta = inf (the dense
   run would never reach it), and eta is NaN where no power law could be fitted.

Run directories hold `config.json` and `metrics.jsonl` as `moma-train` writes them
(DESIGN.md §6); reading never changes them. Nothing here imports JAX.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np

from moma_jax import configs

CONFIG_FILE = 'config.json'        # as saved_run.CONFIG_FILE (which imports JAX)
METRICS_FILE = 'metrics.jsonl'     # as metrics_log.METRICS_FILE (which imports tensorboardX)
SOURCES = ('train', 'eval')
OVERALL = 'overall'
# Smoothing half-widths in decades of FLOPs, per loss source (see 1. above).
DEFAULT_SMOOTH = {'train': 0.2, 'eval': 0.05}
FIT_DECADES = 2.0                  # the power law is fitted to the last 2 decades of FLOPs


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
      raise InputError(f'{os.path.join(self.workdir, METRICS_FILE)} has no {what} rows '
                       f'with {loss_key(source, modality)!r}')
    return self.curves[(source, modality)]


def _read_model_config(workdir: str) -> tuple[tuple[str, ...], str, bool]:
  """(modalities, ffn, mod.enabled) of config.json, today's defaults for missing fields."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise InputError(f'{workdir} is not a training run: no {CONFIG_FILE}')
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f'cannot read {path}: {e}') from e
  model = saved.get('model') if isinstance(saved, dict) else None
  model = model if isinstance(model, dict) else {}
  defaults = configs.default_config().model
  mod = model.get('mod') if isinstance(model.get('mod'), dict) else {}
  return (tuple(model.get('modalities', defaults.modalities)),
          str(model.get('ffn', defaults.ffn)),
          bool(mod.get('enabled', defaults.mod.enabled)))


def _read_metrics(workdir: str) -> list[dict]:
  """The rows of metrics.jsonl. A cut-off last line (a run still writing) is skipped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise InputError(f'{workdir} has no {METRICS_FILE} (not a training run, or nothing '
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
    raise InputError(f'{os.path.join(workdir, METRICS_FILE)} has no usable rows (none with '
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
# Curves: smoothing, the dense curve, its power law, eta.
# ----------------------------------------------------------------------------------------

def smooth_loss(flops: np.ndarray, loss: np.ndarray,
                smooth: float = DEFAULT_SMOOTH['train']) -> np.ndarray:
  """Local linear fit of loss against ln C over +-`smooth` decades, at every point.

  flops [P] (> 0, sorted ascending), loss [P] -> smoothed loss [P]. smooth = 0: the
  loss unchanged. A window holding one distinct FLOPs value gives its mean.
  """
  flops, loss = np.asarray(flops, np.float64), np.asarray(loss, np.float64)
  if smooth <= 0 or loss.size < 2:
    return loss.copy()
  u = np.log(flops)
  half = smooth * math.log(10.0)
  lo = np.searchsorted(u, u - half, side='left')     # window of point i: [lo_i, hi_i)
  hi = np.searchsorted(u, u + half, side='right')
  # Centred so that the window sums below, differences of prefix sums, lose no digits.
  d, y = u - u.mean(), loss - loss.mean()

  def window_sum(x: np.ndarray) -> np.ndarray:     # [P] -> [P]
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    return prefix[hi] - prefix[lo]

  n = (hi - lo).astype(np.float64)
  mean_d, mean_y = window_sum(d) / n, window_sum(y) / n
  var = window_sum(d * d) / n - mean_d**2
  cov = window_sum(d * y) / n - mean_d * mean_y
  slope = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 0.0)
  return mean_y + slope * (d - mean_d) + loss.mean()


def _decreasing_blocks(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Isotonic (non-increasing) least-squares fit of y [P] by pool adjacent violators.

  Returns (values [K], starts [K + 1]): block k covers y[starts[k]:starts[k+1]] and
  takes the value values[k]; values strictly decrease (equal neighbours are pooled).
  """
  values: list[float] = []
  weights: list[int] = []
  starts: list[int] = []
  for i, v in enumerate(y.tolist()):
    values.append(v)
    weights.append(1)
    starts.append(i)
    while len(values) > 1 and values[-1] >= values[-2]:
      w = weights[-2] + weights[-1]
      values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
      weights[-2] = w
      del values[-1], weights[-1], starts[-1]
  return np.array(values), np.array(starts + [len(y)])


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L = a * C^-b + c."""
  a: float
  b: float
  c: float

  def loss(self, flops: np.ndarray) -> np.ndarray:
    """flops [P] -> loss [P]."""
    return self.a * np.power(np.asarray(flops, np.float64), -self.b) + self.c

  def log_flops(self, loss: np.ndarray) -> np.ndarray:
    """loss [P] -> ln C [P] at which the law reaches it; inf at or below c."""
    gap = np.asarray(loss, np.float64) - self.c
    with np.errstate(divide='ignore', invalid='ignore'):
      return np.where(gap > 0, (math.log(self.a) - np.log(gap)) / self.b, np.inf)


def _refine(x: np.ndarray, loss: np.ndarray, theta: np.ndarray) -> np.ndarray:
  """Levenberg-Marquardt on theta = (ln A, b, c) of loss ~ A e^{-b x} + c, in loss units.

  x [P], loss [P]; steps that leave b > 0 and c < min(loss) are the only ones taken.
  """
  def residual(t):
    return loss - (np.exp(t[0] - t[1] * x) + t[2])

  r = residual(theta)
  cost, damping = r @ r, 1e-3
  for _ in range(200):
    f = np.exp(theta[0] - theta[1] * x)
    jac = np.stack([f, -x * f, np.ones_like(x)], axis=1)        # [P, 3] d(model)/d(theta)
    jtj, grad = jac.T @ jac, jac.T @ r
    try:
      step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj)), grad)
    except np.linalg.LinAlgError:
      break
    new = theta + step
    new_r = residual(new) if new[1] > 0 and new[2] < loss.min() else None
    if new_r is not None and np.isfinite(new_r @ new_r) and new_r @ new_r < cost:
      done = cost - new_r @ new_r <= 1e-14 * cost
      theta, r, cost, damping = new, new_r, new_r @ new_r, max(damping / 10, 1e-12)
      if done:
        break
    else:
      damping *= 10
      if damping > 1e12:
        break
  return theta


def fit_power_law(flops: np.ndarray, loss: np.ndarray) -> PowerLaw | None:
  """Least-squares fit of L = a*C^-b + c (b > 0, c below every loss), numpy only.

  flops [P] > 0, loss [P]. A grid of asymptotes c below min(loss) each gives ln A and b
  by linear least squares of ln(L - c) on ln C; the grid point with the smallest squared
  error in loss units starts Levenberg-Marquardt steps on all three. ln C is centred
  (A is the law's value above c at the geometric mean of C) so the problem stays well
  conditioned at 1e20 FLOPs. None for fewer than 3 distinct FLOPs or a rising curve.
  """
  flops, loss = np.asarray(flops, np.float64), np.asarray(loss, np.float64)
  x = np.log(flops)
  if np.unique(x).size < 3:
    return None
  x0 = x.mean()
  x = x - x0
  spread = max(np.ptp(loss), 1e-9 * max(1.0, abs(loss.min())))
  cs = loss.min() - spread * np.geomspace(1e-4, 1e3, 141)       # [G] candidate c
  logs = np.log(loss[None, :] - cs[:, None])                     # [G, P]
  slope = ((logs - logs.mean(1, keepdims=True)) @ x) / (x @ x)   # [G]
  ln_a = logs.mean(1)                                            # x is centred
  pred = np.exp(ln_a[:, None] + slope[:, None] * x[None, :]) + cs[:, None]
  sse = np.where(slope < 0, ((loss[None, :] - pred)**2).sum(1), np.inf)
  if not np.isfinite(sse).any():
    return None
  g = int(np.argmin(sse))
  ln_a, b, c = _refine(x, loss, np.array([ln_a[g], -slope[g], cs[g]]))
  # A e^{-b (ln C - x0)} = (A e^{b x0}) C^-b.
  return PowerLaw(a=float(math.exp(ln_a + b * x0)), b=float(b), c=float(c))


@dataclasses.dataclass(frozen=True)
class DenseCurve:
  """The dense run's smoothed, non-increasing loss curve (K knots) and its power law."""
  flops: np.ndarray            # [K] increasing
  loss: np.ndarray             # [K] strictly decreasing
  fit: PowerLaw | None         # None: no extrapolation possible

  def inside(self, loss: np.ndarray) -> np.ndarray:
    """loss [P] -> [P] bool: within the measured loss range."""
    return (loss >= self.loss[-1]) & (loss <= self.loss[0])

  def flops_at(self, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """loss [P] -> (C_dense [P], extrapolated [P] bool)."""
    loss = np.asarray(loss, np.float64)
    log_c = np.log(self.flops)
    out = np.interp(loss, self.loss[::-1], log_c[::-1])         # np.interp wants xp rising
    outside = ~self.inside(loss)
    for end, side in ((-1, loss < self.loss[-1]), (0, loss > self.loss[0])):
      if side.any():
        out[side] = self._extrapolate(loss[side], self.loss[end], log_c[end])
    return np.exp(out), outside

  def _extrapolate(self, loss: np.ndarray, end_loss: float, end_log_c: float) -> np.ndarray:
    """ln C_dense [P] from the power law, anchored at the end knot (end_loss, ln C_end)."""
    if self.fit is None:
      return np.full(loss.shape, np.nan)
    anchor = self.fit.log_flops(np.array([end_loss]))[0]
    if not np.isfinite(anchor):        # the knot sits below the fit's asymptote
      return self.fit.log_flops(loss)
    return end_log_c + self.fit.log_flops(loss) - anchor


def dense_curve(flops: np.ndarray, loss: np.ndarray,
                smooth: float = DEFAULT_SMOOTH['train']) -> DenseCurve:
  """The dense run's curve: smoothed, made non-increasing, power law fitted.

  flops [P] > 0 sorted ascending, loss [P] (raw logged losses).
  """
  flops, loss = np.asarray(flops, np.float64), np.asarray(loss, np.float64)
  values, starts = _decreasing_blocks(smooth_loss(flops, loss, smooth))
  counts = np.diff(starts)
  knot_log_c = np.add.reduceat(np.log(flops), starts[:-1]) / counts    # [K] block means
  tail = flops >= flops.max() * 10.0**-FIT_DECADES
  return DenseCurve(np.exp(knot_log_c), values, fit_power_law(flops[tail], loss[tail]))


def eta(dense: DenseCurve, flops: np.ndarray,
        loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """eta = C_dense(L) / C at a sparse run's points.

  flops [P] (the sparse run's C), loss [P] (its losses, already smoothed) ->
  (eta [P], extrapolated [P] bool).
  """
  c_dense, extrapolated = dense.flops_at(loss)
  return c_dense / np.asarray(flops, np.float64), extrapolated


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
  eta: float
  extrapolated: bool


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
            sources: Sequence[str] = ('train',),
            smooth: float | None = None) -> list[Row]:
  """eta at every logged point of every run, per modality and loss source.

  modalities: None = the baseline's, then 'overall'. smooth: the half-width of the
  smoothing window in decades of FLOPs, for every source; None = DEFAULT_SMOOTH. Rows
  come ordered by run, source, modality and FLOPs. Raises InputError for a baseline
  that is not dense, a missing curve, or a run none of whose (smoothed) losses lies
  within the dense range.
  """
  modalities = tuple(modalities or (*baseline.modalities, OVERALL))
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
        rows.extend(Row(run.name, modality, source, int(s), float(c), float(l), float(e),
                        bool(x))
                    for s, c, l, e, x in zip(curve.step, curve.flops, loss, values,
                                             extrapolated))
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
