"""FLOPs savings (eta) against synthetic power-law runs with a known answer.

The dense run's loss of modality m is L_m(C) = a_m * C^-b_m + c_m; the sparse run's text
loss at C is L_text(2C) and its image loss L_image(4C), so it reaches every loss with
exactly 2x and 4x fewer FLOPs than the dense run: eta is 2 and 4 everywhere. numpy only:
the whole file runs in a few seconds.
"""
import json
import math
import os

import numpy as np
import pytest

from moma_jax.analysis import loss_curves
from moma_jax.analysis import savings

TEXT = (30.0, 0.12, 1.5)           # a, b, c
IMAGE = (60.0, 0.15, 2.0)
SPEEDUP = {'text': 2.0, 'image': 4.0}
LAW = {'text': TEXT, 'image': IMAGE}


def law(flops, a, b, c):
  return a * np.power(flops, -b) + c


def logged(every, end):
  """Training FLOPs of points logged every `every` FLOPs up to `end`: [P]."""
  return np.arange(1, int(round(end / every)) + 1) * every


def noisy(loss, rng, noise):
  return loss * (1 + noise * rng.standard_normal(loss.shape))


def sparse_eta(modality, dense_flops, sparse_flops, noise=0.0, seed=0):
  """(eta [P], extrapolated [P]) of the sparse run at sparse_flops [P], as compare does."""
  rng = np.random.default_rng(seed)
  dense_loss = noisy(law(dense_flops, *LAW[modality]), rng, noise)
  sparse_loss = noisy(law(SPEEDUP[modality] * sparse_flops, *LAW[modality]), rng, noise)
  dense = loss_curves.dense_curve(dense_flops, dense_loss)
  return loss_curves.eta(dense, sparse_flops, loss_curves.smooth_loss(sparse_flops, sparse_loss))


@pytest.mark.parametrize('params', [TEXT, IMAGE, (5.0, 0.05, 0.5), (400.0, 0.3, 0.0)])
@pytest.mark.parametrize('spacing', ['log', 'linear'])
def test_power_law_fit_recovers_a_b_c(params, spacing):
  flops = (np.geomspace(1e12, 1e15, 200) if spacing == 'log' else logged(5e12, 1e15))
  fit = loss_curves.fit_power_law(flops, law(flops, *params))
  np.testing.assert_allclose([fit.a, fit.b], params[:2], rtol=1e-3)
  assert fit.c == pytest.approx(params[2], abs=1e-3)
  # And it inverts: the FLOPs at which the law reaches its own losses.
  np.testing.assert_allclose(np.exp(fit.log_flops(law(flops, *params))), flops, rtol=1e-3)


def test_power_law_fit_with_noise_stays_close():
  flops = logged(2e11, 1e15)
  loss = noisy(law(flops, *TEXT), np.random.default_rng(0), 0.01)
  fit = loss_curves.fit_power_law(flops, loss)
  # b and c are strongly correlated under noise; the curve itself must be close.
  np.testing.assert_allclose(fit.loss(flops), law(flops, *TEXT), rtol=3e-3)


def test_power_law_fit_refuses_what_is_no_power_law():
  assert loss_curves.fit_power_law(np.array([1e12, 2e12]), np.array([3.0, 2.0])) is None
  rising = np.geomspace(1e12, 1e15, 50)
  assert loss_curves.fit_power_law(rising, np.log(rising)) is None
  assert loss_curves.fit_power_law(np.full(5, 1e12), np.arange(5.0)) is None


def test_smoothing_keeps_lines_in_log_flops_and_commutes_with_a_flops_scale():
  rng = np.random.default_rng(1)
  flops = np.sort(rng.uniform(1e12, 1e15, 400))          # uneven spacing
  line = 7.0 - 0.1 * np.log(flops)
  # A local linear fit reproduces a line exactly, ends included (a moving average would
  # not: its windows are one-sided there).
  np.testing.assert_allclose(loss_curves.smooth_loss(flops, line, 0.3), line, rtol=1e-9)
  loss = noisy(law(flops, *TEXT), rng, 0.01)
  # Scaling every C by eta shifts ln C: the smoothed values must not change, so that
  # smoothing bias cancels between the dense and a sparse run.
  np.testing.assert_allclose(loss_curves.smooth_loss(3.7 * flops, loss, 0.2),
                             loss_curves.smooth_loss(flops, loss, 0.2), rtol=1e-9)
  np.testing.assert_array_equal(loss_curves.smooth_loss(flops, loss, 0.0), loss)
  # It does smooth: the noise left is a fraction of the 1% put in.
  rest = loss_curves.smooth_loss(flops, loss, 0.2) / law(flops, *TEXT) - 1
  assert np.std(rest[200:]) < 0.3 * 0.01


def test_dense_curve_is_the_isotonic_fit_with_plateaus_at_their_middle():
  flops = np.array([1.0, 10.0, 100.0, 1000.0, 10000.0])
  loss = np.array([5.0, 3.0, 4.0, 3.5, 1.0])
  curve = loss_curves.dense_curve(flops, loss, smooth=0.0)
  # Pool adjacent violators: 3, 4, 3.5 pool into their mean 3.5, one knot at the middle
  # of the pooled block in log-FLOPs (100), not at its first point.
  np.testing.assert_allclose(curve.loss, [5.0, 3.5, 1.0])
  np.testing.assert_allclose(curve.flops, [1.0, 100.0, 10000.0])
  # ln C is linear in L between knots: halfway from 3.5 to 1 is halfway from 1e2 to 1e4.
  c_dense, extrapolated = curve.flops_at(np.array([2.25, 5.0, 1.0]))
  np.testing.assert_allclose(c_dense, [1000.0, 1.0, 10000.0])
  assert not extrapolated.any()


def test_dense_curve_of_noisy_losses_is_monotone():
  flops = logged(1e11, 1e15)
  loss = noisy(law(flops, *IMAGE), np.random.default_rng(2), 0.02)
  curve = loss_curves.dense_curve(flops, loss)
  assert np.all(np.diff(curve.loss) < 0) and np.all(np.diff(curve.flops) > 0)
  assert curve.loss[0] <= loss.max() and curve.loss[-1] >= loss.min()


@pytest.mark.parametrize('modality', ['text', 'image'])
def test_eta_of_clean_runs(modality):
  # Different logging intervals and lengths: the dense run logs every 1e12 FLOPs up to
  # 1e15, the sparse run every 1e11 up to 8e14. Its first points are above the dense
  # run's highest loss, its last ones below its lowest.
  dense_flops, sparse_flops = logged(1e12, 1e15), logged(1e11, 8e14)
  values, extrapolated = sparse_eta(modality, dense_flops, sparse_flops)
  speedup = SPEEDUP[modality]
  # Inside / outside the dense range [1e12, 1e15] of FLOPs-equivalents; a point within
  # a smoothing window of the range's ends may fall either way.
  equivalent = speedup * sparse_flops
  np.testing.assert_array_equal(extrapolated[(equivalent >= 1.6e12) & (equivalent <= 6e14)],
                                False)
  np.testing.assert_array_equal(extrapolated[(equivalent < 0.6e12) | (equivalent > 1.6e15)],
                                True)
  assert extrapolated[0] and extrapolated[-1]
  np.testing.assert_allclose(values[~extrapolated], speedup, rtol=0.02)
  # The power law is the truth here, so the extrapolated points are right too.
  np.testing.assert_allclose(values[extrapolated], speedup, rtol=0.02)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('modality', ['text', 'image'])
def test_eta_of_noisy_runs(modality, seed):
  # 1% multiplicative noise on every loss, per-step logging (the dense run every 2e10
  # FLOPs, the sparse run every 3e10). A point's eta is ~20% off from its own noise (the
  # loss falls ~0.1 per e-fold of FLOPs), so it takes some 500 points per window to get
  # within 5%: the first decade has too few of them and is left out.
  dense_flops, sparse_flops = logged(2e10, 1e15), logged(3e10, 8e14)
  values, extrapolated = sparse_eta(modality, dense_flops, sparse_flops, 0.01, seed)
  speedup = SPEEDUP[modality]
  assert not extrapolated[speedup * sparse_flops <= 0.8e15].any()
  assert extrapolated[speedup * sparse_flops > 1.2e15].all()
  measured = ~extrapolated & (sparse_flops >= 1e13)
  assert measured.sum() > 100
  np.testing.assert_allclose(values[measured], speedup, rtol=0.05)
  np.testing.assert_allclose(values[extrapolated], speedup, rtol=0.10)


def test_eta_is_inf_below_the_asymptote_and_nan_without_a_fit():
  flops = np.geomspace(1e12, 1e15, 100)
  curve = loss_curves.dense_curve(flops, law(flops, *TEXT))
  values, extrapolated = loss_curves.eta(curve, np.array([1e15, 1e15]), np.array([1.4, 1.6]))
  assert math.isinf(values[0]) and math.isfinite(values[1]) and extrapolated.all()
  no_fit = loss_curves.DenseCurve(curve.flops, curve.loss, None)
  values, extrapolated = loss_curves.eta(no_fit, np.array([1e15]), np.array([1.6]))
  assert math.isnan(values[0]) and extrapolated.all()


# ----------------------------------------------------------------------------------------
# compare() and reading run directories.
# ----------------------------------------------------------------------------------------

def make_run(name, speedup, flops, ffn='sparse', mod=False, source='train'):
  """A Run in memory whose text / image / overall losses are the dense laws at speedup*C."""
  flops = np.asarray(flops, np.float64)
  curves = {}
  for modality, params in (*LAW.items(), ('overall', (45.0, 0.13, 1.8))):
    scale = speedup.get(modality, 1.0)
    curves[(source, modality)] = savings.Curve(np.arange(1, flops.size + 1), flops,
                                               law(scale * flops, *params))
  return savings.Run(f'/runs/{name}', name, ('text', 'image'), ffn, mod, curves)


def test_compare_rows_in_order():
  dense = make_run('dense', {}, logged(1e12, 1e15), ffn='dense')
  sparse = make_run('moma', {**SPEEDUP, 'overall': 3.0}, logged(7e11, 7e14))
  # The law is the truth here: trusted as far as the run goes (image: 2.8x dense's FLOPs).
  rows = savings.compare(dense, [sparse], max_extrapolation=3.0)
  assert [r.modality for r in rows[::1000]] == ['text', 'image', 'overall']
  assert len(rows) == 3 * 1000
  for modality, speedup in (('text', 2.0), ('image', 4.0), ('overall', 3.0)):
    mine = [r for r in rows if r.modality == modality]
    assert [r.step for r in mine] == list(range(1, 1001))
    assert all(abs(r.eta / speedup - 1) < 0.02 for r in mine), modality
  last = savings.final_rows(rows)[('moma', 'train')]
  assert last['text'].train_flops == pytest.approx(7e14) and last['text'].extrapolated


def test_eta_beyond_the_extrapolation_limit_is_a_lower_bound():
  """A run 4x more efficient than dense on images, 2x on text, with as many FLOPs: its
  end needs 4x and 2x the dense run's FLOPs. With the law trusted up to 2x (default),
  text stays a number and image becomes the bound 2 * C_end / C; up to 5x, both are
  numbers; a loss below the asymptote or without a fitted law is a bound too."""
  flops = logged(1e12, 1e15)
  dense = make_run('dense', {}, flops, ffn='dense')
  sparse = make_run('moma', {**SPEEDUP, 'overall': 3.0}, flops)
  last = savings.final_rows(savings.compare(dense, [sparse]))[('moma', 'train')]
  assert not last['text'].bound and last['text'].extrapolated
  assert abs(last['text'].eta / 2.0 - 1) < 0.02
  assert last['image'].bound and last['image'].eta == pytest.approx(2.0)
  assert last['overall'].bound and last['overall'].eta == pytest.approx(2.0)
  wide = savings.final_rows(savings.compare(dense, [sparse], max_extrapolation=5.0))
  assert not any(r.bound for r in wide[('moma', 'train')].values())
  assert abs(wide[('moma', 'train')]['image'].eta / 4.0 - 1) < 0.02
  # Every value is finite; measured points are never bounds.
  rows = savings.compare(dense, [sparse])
  assert all(math.isfinite(r.eta) for r in rows)
  assert not any(r.bound and not r.extrapolated for r in rows)
  with pytest.raises(savings.InputError, match='must be >= 1'):
    savings.compare(dense, [sparse], max_extrapolation=0.5)


def test_bound_where_the_law_never_reaches_the_loss():
  flops = logged(1e12, 1e15)
  dense = make_run('dense', {}, flops, ffn='dense')
  # Text losses that fall below the dense law's asymptote (1.5) at the end.
  run = make_run('moma', {}, flops * 0.5)
  text = run.curves[('train', 'text')]
  loss = text.loss.copy()
  loss[-50:] = np.linspace(1.49, 1.45, 50)
  run.curves[('train', 'text')] = savings.Curve(text.step, text.flops, loss)
  last = savings.final_rows(savings.compare(dense, [run], ['text']))[('moma', 'train')]
  assert last['text'].bound and last['text'].eta == pytest.approx(2 * 1e15 / 5e14)


@pytest.mark.parametrize('baseline,runs,modalities,message', [
    (dict(ffn='moma'), {}, None, "not a dense run (model.ffn is 'moma')"),
    (dict(ffn='dense', mod=True), {}, None, 'not a dense run (model.mod.enabled is true)'),
    (dict(ffn='dense'), {}, ['text', 'audio'], "unknown modality 'audio'"),
    # Every loss of the run is below the dense run's lowest: nothing to interpolate.
    (dict(ffn='dense'), dict(speedup={'text': 1e6}), None,
     "moma: no overlapping loss range with the baseline for 'loss/text'"),
    (dict(ffn='dense'), dict(source='eval'), None,
     "has no training rows with 'loss/text'"),
])
def test_compare_refuses(baseline, runs, modalities, message):
  runs = dict(runs)
  dense = make_run('dense', {}, logged(1e12, 1e15), **baseline)
  sparse = make_run('moma', runs.pop('speedup', SPEEDUP), logged(7e11, 7e14), **runs)
  with pytest.raises(savings.InputError) as e:
    savings.compare(dense, [sparse], modalities)
  assert message in str(e.value)


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def test_read_run_keeps_usable_points_only(tmp_path):
  workdir = str(tmp_path / 'run')
  write(os.path.join(workdir, 'config.json'),
        json.dumps({'model': {'ffn': 'dense', 'modalities': ['text', 'image'],
                              'mod': {'enabled': False}}}))
  rows = [
      {'step': 2, 'train_flops': 2e12, 'loss': 3.0, 'loss/text': 2.5, 'loss/image': None,
       'tokens_per_sec': 9.0, 'route/left_behind/text': 0.1},
      {'step': 1, 'train_flops': 1e12, 'loss': 4.0, 'loss/text': 3.5, 'loss/image': 5.0},
      {'step': 0, 'train_flops': 0, 'eval/loss': 9.0},        # no log-FLOPs place
      {'step': 2, 'train_flops': 2e12, 'eval/loss': 2.9, 'eval/loss/text': 2.4},
  ]
  write(os.path.join(workdir, 'metrics.jsonl'),
        ''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 3, "loss"')  # cut off
  run = savings.read_run(workdir)
  assert run.name == 'run' and run.dense and run.modalities == ('text', 'image')
  np.testing.assert_array_equal(run.curves[('train', 'overall')].loss, [4.0, 3.0])
  np.testing.assert_array_equal(run.curves[('train', 'overall')].step, [1, 2])
  np.testing.assert_array_equal(run.curves[('train', 'image')].flops, [1e12])
  np.testing.assert_array_equal(run.curves[('eval', 'text')].loss, [2.4])
  assert ('eval', 'image') not in run.curves


@pytest.mark.parametrize('files,message', [
    ({}, 'no such run directory'),
    ({'metrics.jsonl': ''}, 'is not a training run: no config.json'),
    ({'config.json': '{}'}, 'has no metrics.jsonl'),
    ({'config.json': '{', 'metrics.jsonl': ''}, 'cannot read'),
    ({'config.json': '{}', 'metrics.jsonl': '{"step": 1, "tokens": 5}\n'},
     'has no usable rows'),
    ({'config.json': '{}', 'metrics.jsonl': '{"step": 1, "loss": null, "train_flops": 1}\n'},
     'has no usable rows'),
    ({'config.json': '{}', 'metrics.jsonl': 'oops\n{"step": 1}\n'}, 'metrics.jsonl:1: not'),
])
def test_read_run_refuses(tmp_path, files, message):
  workdir = str(tmp_path / 'run')
  for name, text in files.items():
    write(os.path.join(workdir, name), text)
  with pytest.raises(savings.InputError) as e:
    savings.read_run(workdir)
  assert message in str(e.value)


def test_run_names_are_short_and_distinct():
  assert savings.run_names(['runs/dense', 'runs/moma']) == ['dense', 'moma']
  assert savings.run_names(['a/moma', 'b/moma', 'c/dense']) == ['a/moma', 'b/moma',
                                                               'c/dense']
  assert savings.run_names(['x/moma', 'x/moma']) == ['moma', 'moma#2']
  assert savings.run_names(['a/moma', 'b/moma', 'a/moma/']) == ['a/moma', 'b/moma',
                                                                'a/moma#2']


def test_savings_imports_no_jax():
  import subprocess
  import sys
  code = 'import sys, moma_jax.analysis.savings, moma_jax.analysis.loss_curves; print("jax" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=os.path.join(os.path.dirname(__file__), '..'), check=True)
  assert out.stdout.strip() == 'False'
