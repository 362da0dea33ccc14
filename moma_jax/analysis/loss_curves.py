"""Loss curves against training FLOPs: smoothing, the dense curve, its power law, eta.

The numerics of moma_jax/analysis/savings.py (which reads runs and compares them); numpy only.
eta (design §1): at a sparse run's point (training FLOPs C, loss L), `eta = C_dense(L) /
C`, C_dense(L) being the training FLOPs at which the dense run reaches L.

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
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# Smoothing half-widths in decades of FLOPs, per loss source (see 1. above).
DEFAULT_SMOOTH = {'train': 0.2, 'eval': 0.05}
FIT_DECADES = 2.0                  # the power law is fitted to the last 2 decades of FLOPs


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
