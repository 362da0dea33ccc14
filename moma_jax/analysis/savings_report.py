"""FLOPs-savings results as files and figures: savings.csv, savings.md, two PNGs.

  rows = savings.compare(baseline, runs, ...)
  savings_report.write_csv(rows, 'out/savings.csv')
  savings_report.markdown(rows, baseline)           # the summary table, as text
  savings_report.eta_figure(baseline, runs, rows)   # a matplotlib Figure, for notebooks

The numbers come from moma_jax/analysis/savings.py; this module only lays them out.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Sequence

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from moma_jax.analysis.loss_curves import dense_curve
from moma_jax.analysis.loss_curves import smooth_loss
from moma_jax.analysis.savings import final_rows
from moma_jax.analysis.savings import MAX_EXTRAPOLATION
from moma_jax.analysis.savings import Row
from moma_jax.analysis.savings import Run
from moma_jax.analysis.savings import smoothing
from moma_jax import run_dir

CSV_COLUMNS = ('run', 'modality', 'source', 'step', 'train_flops', 'loss', 'eta',
               'extrapolated', 'bound')
MARK = '*'                         # markdown: an extrapolated eta
LOSS_PNG = 'loss_vs_flops.png'
ETA_PNG = 'eta_vs_flops.png'


# ----------------------------------------------------------------------------------------
# Writing: csv, markdown, figures. Each file is written whole or not at all.
# ----------------------------------------------------------------------------------------

def write_csv(rows: Sequence[Row], path: str) -> str:
  """savings.csv: one line per Row, columns CSV_COLUMNS. Returns path."""
  with run_dir.atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
      writer.writerow([row.run, row.modality, row.source, row.step, repr(row.train_flops),
                       repr(row.loss), repr(row.eta), row.extrapolated, row.bound])
  return path


BEYOND = '(beyond the dense run)'


def _format_eta(row: Row | None) -> str:
  if row is None:
    return '-'
  if row.bound:
    return f'> {row.eta:.2f} {BEYOND}'
  return f'{row.eta:.2f}' + (MARK if row.extrapolated else '')


def markdown(rows: Sequence[Row], baseline: Run, smooth: float | None = None,
             max_extrapolation: float = MAX_EXTRAPOLATION) -> str:
  """The summary table. Per run, evaluation losses first (fixed validation batches), then
  the noisier training losses; per loss, first eta at the run's last point inside the
  dense run's measured range ("last measured"), then at its end where that differs."""
  modalities = list(dict.fromkeys(r.modality for r in rows))
  lines = ['| run | loss | point | train FLOPs | ' +
           ' | '.join(f'eta {m}' for m in modalities) + ' |',
           '|---|---|---|---:|' + '---:|' * len(modalities)]
  measured, ends = final_rows(rows, measured_only=True), final_rows(rows)
  runs = list(dict.fromkeys(r.run for r in rows))
  for run, source in sorted(ends, key=lambda k: (runs.index(k[0]), k[1] != 'eval')):
    label = 'eval' if source == 'eval' else 'train (noisier)'
    last, inside = ends[(run, source)], measured.get((run, source), {})
    if inside:
      cells = [f'{_format_eta(inside[m])} @ {inside[m].train_flops:.2g}' if m in inside
               else '-' for m in modalities]
      flops = max(r.train_flops for r in inside.values())
      lines.append(f'| {run} | {label} | last measured | {flops:.3g} | ' +
                   ' | '.join(cells) + ' |')
    if any(inside.get(m) is not last.get(m) for m in modalities):
      flops = max(r.train_flops for r in last.values())
      lines.append(f'| {run} | {label} | end | {flops:.3g} | ' +
                   ' | '.join(_format_eta(last.get(m)) for m in modalities) + ' |')
  end = max(c.flops[-1] for c in baseline.curves.values())
  widths = ', '.join(f'±{smoothing(s, smooth):g} for {s}'
                     for s in dict.fromkeys(r.source for r in rows))
  lines += [
      '',
      f'eta = C_dense(L) / C: C the run\'s training FLOPs, L its loss smoothed over decades '
      f'of FLOPs ({widths} losses), C_dense(L) the FLOPs at which the baseline reaches L. '
      f'Baseline: {baseline.name} ({baseline.workdir}; dense FFN, no MoD; {end:.3g} '
      'training FLOPs). "last measured": the last point at which both curves are measured '
      '(@ the run\'s FLOPs there); "end": the run\'s last point.',
      f'Values marked {MARK} are extrapolated: L is outside the baseline\'s measured range, '
      'so C_dense(L) comes from a power law L = a*C^-b + c fitted to the baseline. The law '
      f'is trusted up to {max_extrapolation:g}x the baseline\'s FLOPs; beyond that, or '
      f'where it never reaches L, the table gives the lower bound "> x {BEYOND}". '
      'Evaluation losses come from fixed validation batches; training losses from each '
      'step\'s batch, whose modality mix varies, are noisier.']
  return '\n'.join(lines) + '\n'


def write_markdown(rows: Sequence[Row], baseline: Run, path: str,
                   smooth: float | None = None,
                   max_extrapolation: float = MAX_EXTRAPOLATION) -> str:
  """savings.md: `markdown(...)`. Returns the text written."""
  text = markdown(rows, baseline, smooth, max_extrapolation)
  with run_dir.atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)
  return text


_STYLE = {'train': '-', 'eval': '--'}


def _colors(baseline: Run, runs: Sequence[Run]) -> dict[str, str]:
  """Run name -> colour: the baseline black, the runs matplotlib's cycle C0, C1, ..."""
  return {baseline.name: 'black', **{r.name: f'C{i % 10}' for i, r in enumerate(runs)}}


def _run_handles(baseline: Run, runs: Sequence[Run], sources: Sequence[str]) -> list[Line2D]:
  """Legend entries: one colour per run, one line style per loss source."""
  colors = _colors(baseline, runs)
  handles = [Line2D([], [], color=colors[baseline.name], label=f'{baseline.name} (dense baseline)')]
  handles += [Line2D([], [], color=colors[r.name], label=r.name) for r in runs]
  handles += [Line2D([], [], color='grey', ls=_STYLE[s], label=f'{s} loss') for s in sources]
  return handles


def loss_figure(baseline: Run, runs: Sequence[Run], modalities: Sequence[str],
                sources: Sequence[str] = ('train',),
                smooth: float | None = None) -> Figure:
  """Loss vs training FLOPs (log-log), one panel per modality: logged points faint,
  smoothed curves as lines, the baseline's power law dotted over the whole range."""
  fig = Figure(figsize=(4.6 * len(modalities), 4.4), layout='constrained')
  axes = fig.subplots(1, len(modalities), squeeze=False)[0]
  colors = _colors(baseline, runs)
  everyone = (baseline, *runs)
  for ax, modality in zip(axes, modalities):
    for source in sources:
      for run in everyone:
        curve = run.curve(source, modality)
        # Some thousand logged points show the noise; a million would only be slow.
        every = max(1, curve.flops.size // 3000)
        ax.plot(curve.flops[::every], curve.loss[::every], '.', color=colors[run.name], ms=2,
                alpha=0.25)
        ax.plot(curve.flops, smooth_loss(curve.flops, curve.loss, smoothing(source, smooth)),
                _STYLE[source], color=colors[run.name], lw=1.5)
      dense = baseline.curve(source, modality)
      fit = dense_curve(dense.flops, dense.loss, smoothing(source, smooth)).fit
      if fit is not None:
        span = np.geomspace(min(r.curve(source, modality).flops[0] for r in everyone),
                            max(r.curve(source, modality).flops[-1] for r in everyone), 200)
        ax.plot(span, fit.loss(span), ':', color='black', lw=1)
    ax.set(xscale='log', yscale='log', xlabel='training FLOPs', ylabel=f'loss ({modality})',
           title=modality)
    # Losses often span less than a decade, where a log axis would label one tick or
    # two (2x10^0): evenly spaced plain numbers instead.
    lo, hi = ax.get_ylim()
    ticks = [t for t in ticker.MaxNLocator(nbins=6).tick_values(lo, hi) if lo <= t <= hi]
    ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(True, which='both', alpha=0.2)
  handles = _run_handles(baseline, runs, sources) + [
      Line2D([], [], color='grey', ls='', marker='.', alpha=0.5, label='logged points'),
      Line2D([], [], color='black', ls=':', label='dense power-law fit')]
  fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 5))
  fig.suptitle('Loss vs training FLOPs')
  return fig


def eta_figure(baseline: Run, runs: Sequence[Run], rows: Sequence[Row]) -> Figure:
  """eta vs the run's training FLOPs (log x), one panel per modality; a dashed line at
  eta = 1; extrapolated stretches dotted with open markers, lower bounds as up-triangles."""
  modalities = list(dict.fromkeys(r.modality for r in rows))
  sources = list(dict.fromkeys(r.source for r in rows))
  fig = Figure(figsize=(4.6 * len(modalities), 4.4), layout='constrained')
  axes = fig.subplots(1, len(modalities), squeeze=False)[0]
  colors = _colors(baseline, runs)
  for ax, modality in zip(axes, modalities):
    ax.axhline(1.0, ls='--', color='grey', lw=1)
    for run in runs:
      for source in sources:
        mine = [r for r in rows if (r.run, r.modality, r.source) == (run.name, modality, source)]
        flops = np.array([r.train_flops for r in mine])
        value = np.array([r.eta for r in mine])
        bound = np.array([r.bound for r in mine], dtype=bool)
        if bound.any():
          # Lower bounds, not values: up-triangles, never joined into the curve.
          at = np.flatnonzero(bound)[::max(1, int(bound.sum()) // 8)]
          ax.plot(flops[at], value[at], '^', mfc='none', ms=5, color=colors[run.name])
        value[~np.isfinite(value) | bound] = np.nan
        extra = np.array([r.extrapolated for r in mine], dtype=bool)
        # The dotted stretch takes in its measured neighbours so the two lines join.
        joined = extra.copy()
        joined[:-1] |= extra[1:]
        joined[1:] |= extra[:-1]
        style = dict(color=colors[run.name], ls=_STYLE[source])
        ax.plot(flops, np.where(extra, np.nan, value), lw=1.5, **style)
        ax.plot(flops, np.where(joined, value, np.nan), lw=1, alpha=0.8,
                **{**style, 'ls': ':'})
        if extra.any():
          # A marker about every 1/8 decade of FLOPs, not at each of many points.
          ex = flops[extra]
          marks = np.geomspace(ex[0], ex[-1], int(8 * math.log10(ex[-1] / ex[0])) + 1)
          at = np.unique(np.searchsorted(ex, marks).clip(0, ex.size - 1))
          ax.plot(ex[at], value[extra][at], 'o', mfc='none', ms=4, color=colors[run.name])
    ax.set(xscale='log', xlabel='training FLOPs of the run',
           ylabel=f'eta = C_dense(L) / C ({modality})', title=modality)
    # The measured values set the scale.
    measured = [r.eta for r in rows if r.modality == modality and not r.extrapolated
                and math.isfinite(r.eta)]
    if measured:
      ax.set_ylim(min(0.9, min(measured) * 0.9), max(1.1, max(measured)) * 1.25)
    ax.grid(True, which='both', alpha=0.2)
  handles = _run_handles(baseline, runs, sources)[1:] + [
      Line2D([], [], color='grey', ls=':', marker='o', mfc='none', ms=4,
             label='extrapolated (power law)'),
      Line2D([], [], color='grey', ls='', marker='^', mfc='none', ms=5,
             label='lower bound (beyond the dense run)'),
      Line2D([], [], color='grey', ls='--', lw=1, label='eta = 1 (no savings)')]
  fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 5))
  fig.suptitle(f'FLOPs savings eta vs the dense baseline {baseline.name!r}')
  return fig


def write_plots(baseline: Run, runs: Sequence[Run], rows: Sequence[Row], out_dir: str,
                smooth: float | None = None) -> list[str]:
  """loss_vs_flops.png and eta_vs_flops.png in out_dir; returns their paths."""
  modalities = list(dict.fromkeys(r.modality for r in rows))
  sources = list(dict.fromkeys(r.source for r in rows))
  paths = []
  for name, fig in ((LOSS_PNG, loss_figure(baseline, runs, modalities, sources, smooth)),
                    (ETA_PNG, eta_figure(baseline, runs, rows))):
    path = os.path.join(out_dir, name)
    with run_dir.atomic_path(path) as tmp:
      fig.savefig(tmp, format='png', dpi=110)
    paths.append(path)
  return paths
