"""Upcycling (moma_jax/training/upcycle.py): a 1t1i run's step N grown into a 4t4i run.

The module shares one tiny 1t1i source run (3 steps, checkpoints at 2 and 3) and one
4t4i run upcycled from its step 2 (4 steps, Gumbel router noise, checkpoints at 2 and
4); both record every batch they train on. The rest is exact: copied weights, a fresh
optimizer, the batch that comes next, the FLOPs count that goes on.
"""
import hashlib
import os
import signal
import time

import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config, tiny_train_config, train_usage_error
from moma_jax.analysis import flops
from moma_jax import configs
from moma_jax.data import pipeline
from moma_jax.inference import saved_run
from moma_jax.runs import saved
from moma_jax.model import param_names
from moma_jax.model import routing_spec
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax import run_dir
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import metrics_log
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.runs import state as train_state
from moma_jax.training import trainer as train
from moma_jax.training import upcycle

QUICKSTART = 'experiments/quickstart.py'
AT_STEP = 2
EXACT_KEYS = ('loss', 'loss/text', 'loss/image', 'train_flops', 'tokens', 'lr')


def source_config(data_dir):
  c = tiny_train_config(data_dir, 'moma_4t4i', steps=3, ckpt_every=AT_STEP, eval_every=100)
  c.model.experts = (1, 1)
  return configs.validate(c)


def upcycled_config(data_dir, source_workdir, steps=4, optimizer='restart'):
  c = tiny_train_config(data_dir, 'moma_4t4i', steps=steps, ckpt_every=2, eval_every=100)
  c.model.router_noise = 'gumbel'           # the paper's: breaks the tie of equal experts
  c.upcycle.from_workdir, c.upcycle.at_step = source_workdir, AT_STEP
  c.upcycle.optimizer = optimizer
  return configs.validate(c)


def train_recording(config, workdir, **kwargs):
  """(train.train's progress, every batch the run trained on, in order)."""
  batches, original = [], pipeline.train_iterator

  class Recording:
    def __init__(self, it):
      self._it = it

    def __next__(self):
      batch = next(self._it)
      batches.append({k: np.array(v) for k, v in batch.items()})
      return batch

    def get_state(self):
      return self._it.get_state()

    def set_state(self, state):
      self._it.set_state(state)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, 'train_iterator', lambda *a, **k: Recording(original(*a, **k)))
    progress = train.train(config, workdir, **kwargs)
  return progress, batches


def training_rows(workdir):
  return [r for r in metrics_log.read_rows(workdir) if 'loss' in r]


def flat(params):
  """{'layer_0/experts/wi_0': array, ...}"""
  return {'/'.join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def source_run(data_setup, tmp_path_factory):
  config = source_config(data_setup[0].data.data_dir)
  workdir = str(tmp_path_factory.mktemp('upcycle') / 'moma_1t1i')
  _, batches = train_recording(config, workdir)
  return dict(config=config, workdir=workdir, batches=batches, rows=training_rows(workdir))


@pytest.fixture(scope='module')
def upcycled_run(source_run, tmp_path_factory):
  config = upcycled_config(source_run['config'].data.data_dir, source_run['workdir'])
  workdir = str(tmp_path_factory.mktemp('upcycle') / 'moma_4t4i')
  progress, batches = train_recording(config, workdir)
  return dict(config=config, workdir=workdir, batches=batches, progress=progress,
              rows=training_rows(workdir))


@pytest.fixture(scope='module')
def carried_run(source_run, tmp_path_factory):
  """Upcycled from the same step with the source's optimizer carried: 1 step, where the
  source's 3-step schedule ends."""
  config = upcycled_config(source_run['config'].data.data_dir, source_run['workdir'],
                           steps=1, optimizer='carry')
  workdir = str(tmp_path_factory.mktemp('upcycle') / 'moma_4t4i_carry')
  train.train(config, workdir)
  return dict(config=config, workdir=workdir, rows=training_rows(workdir))


def start_of(config):
  """(fresh state, upcycled state, progress) as `train.train` makes them."""
  model = transformer.build(config)
  tx = optimizer_lib.optimizer(config)
  mesh = sharding.make_mesh(config)
  _, state_sh = train_state.layout(model, tx, mesh)
  fresh = train_state.create(model, tx, state_sh, config.train.seed)
  return (fresh, *upcycle.initial_state(config, tx, model, state_sh, mesh))


def host_path_start(config):
  """The upcycled state as it was first built, through the host: the source read
  whole onto one device, a fresh init of the whole state, the parameter map run
  eagerly, each array then placed by its sharding."""
  model = transformer.build(config)
  tx = optimizer_lib.optimizer(config)
  _, state_sh = train_state.layout(model, tx, sharding.make_mesh(config))
  fresh = train_state.create(model, tx, state_sh, config.train.seed)
  u = config.upcycle
  source = saved_run.load(u.from_workdir, u.at_step, with_aux_routers=False)
  host = jax.device_get(upcycle.upcycle_params(source.params, source.config,
                                               fresh['params'], config))
  params = jax.tree.map(lambda x, sh: jax.make_array_from_callback(
      x.shape, sh, lambda index: x[index]), host, state_sh['params'])
  return {'params': params, 'opt': jax.jit(tx.init, out_shardings=state_sh['opt'])(params)}


# ----------------------------------------------------------------------------------
# The start: copied FFNs, fresh routers, fresh optimizer
# ----------------------------------------------------------------------------------
def test_every_expert_starts_as_its_modalitys_ffn(source_run, upcycled_run):
  config = upcycled_run['config']
  fresh, state, progress = start_of(config)
  source = saved_run.load(source_run['workdir'], AT_STEP, with_aux_routers=False)
  src, got, init = flat(source.params), flat(state['params']), flat(fresh['params'])
  src_slots = source.model.spec.slots
  dst_slots = routing_spec.from_config(config).slots
  assert src_slots == ((0,), (1,)) and sorted(sum(dst_slots, ())) == list(range(8))
  checked = {'experts': 0, 'routers': 0, 'copied': 0}
  for name, value in got.items():
    *module, leaf = name.split('/')
    if module[-1:] == ['experts'] and leaf in ('wi_0', 'wi_1', 'wo'):
      assert value.shape[0] == 8
      for i, modality in enumerate(config.model.modalities):
        for j, s in enumerate(dst_slots[i]):
          np.testing.assert_array_equal(value[s], src[name][src_slots[i][0]],
                                        err_msg=f'{name} expert {j} of {modality}')
      checked['experts'] += 1
    elif leaf.startswith('router_'):
      np.testing.assert_array_equal(value, init[name])   # the target's own init
      assert value.shape == (config.model.d_model, 4)
      checked['routers'] += 1
    else:
      np.testing.assert_array_equal(value, src[name], err_msg=name)
      checked['copied'] += 1
  layers = config.model.num_layers
  assert checked == {'experts': 3 * layers, 'routers': 2 * layers,
                     'copied': len(got) - 5 * layers}
  assert set(got) == set(init)
  assert progress['step'] == 0 and progress['data'] == source.progress['data']


def test_the_sharded_start_equals_the_host_path_bit_for_bit(upcycled_run):
  config = upcycled_run['config']
  _, state, _ = start_of(config)
  want = host_path_start(config)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.sharding == b.sharding, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def test_check_source_reads_no_array(source_run, upcycled_run, monkeypatch):
  """The trainer checks the source before it writes anything, from files alone."""
  config = upcycled_run['config']
  monkeypatch.setattr(saved, 'restore_state', lambda *a, **k: pytest.fail('read'))
  upcycle.check_source(config)
  bad = configs.validate(config.copy_and_resolve_references())
  bad.upcycle.at_step = 7
  with pytest.raises(run_dir.RunDirError, match='has no checkpoint of step 7; it has 2, 3'):
    upcycle.check_source(bad)


def test_optimizer_and_lr_schedule_restart(upcycled_run):
  config = upcycled_run['config']
  _, state, _ = start_of(config)
  leaves = jax.tree.leaves(state['opt'])
  assert leaves and all(not np.any(np.asarray(x)) for x in leaves)   # moments 0, count 0
  # Logged lr of update u is schedule(u) from u = 0, as in a new run (the source's
  # schedule was at update 2).
  schedule = optimizer_lib.learning_rate(config)
  assert [r['lr'] for r in upcycled_run['rows']] == [float(schedule(u)) for u in range(4)]
  # The optimizer counted only the new run's updates.
  model = transformer.build(config)
  ckpts = ckpt_lib.Checkpoints(upcycled_run['workdir'])
  try:
    abstract, _ = train_state.layout(model, optimizer_lib.optimizer(config),
                                     sharding.one_device_mesh())
    saved, _ = ckpts.restore(2, abstract)
  finally:
    ckpts.close()
  counts = [int(v) for path, v in jax.tree_util.tree_flatten_with_path(saved['opt'])[0]
            if 'count' in jax.tree_util.keystr(path)]
  assert counts and set(counts) == {2}


def saved_state(config, workdir, step):
  """The {'params', 'opt'} state of checkpoint `step` of the run of `config`."""
  abstract, _ = train_state.layout(transformer.build(config), optimizer_lib.optimizer(config),
                                   sharding.one_device_mesh())
  ckpts = ckpt_lib.Checkpoints(workdir)
  try:
    return ckpts.restore(step, abstract)[0]
  finally:
    ckpts.close()


def test_a_carried_optimizer_continues_the_sources(source_run, carried_run):
  """upcycle.optimizer='carry': each expert's AdamW moments are its source FFN's, the
  fresh routers' 0, the update count the source's; the one update of the run takes the
  learning rate the source's own next update took."""
  config, source = carried_run['config'], source_run['config']
  _, state, _ = start_of(config)
  src = saved_state(source, source_run['workdir'], AT_STEP)['opt']
  index = upcycle.expert_sources(source, config)
  for key in ('mu', 'nu'):
    src_moments = flat(optax.tree_utils.tree_get(src, key))
    moments = optax.tree_utils.tree_get(state['opt'], key)
    checked = set()
    for path, value in jax.tree_util.tree_flatten_with_path(moments)[0]:
      name, role = '/'.join(str(k.key) for k in path), param_names.role(path)
      value = np.asarray(value)
      if role == 'expert_router':
        assert not np.any(value), name
      elif role == 'expert':
        np.testing.assert_array_equal(value, src_moments[name][index], err_msg=name)
      else:
        np.testing.assert_array_equal(value, src_moments[name], err_msg=name)
      checked.add(role)
    assert {'expert', 'expert_router'} <= checked
    assert any(np.any(v) for v in src_moments.values())
  counts = {int(v) for path, v in jax.tree_util.tree_flatten_with_path(state['opt'])[0]
            if 'count' in jax.tree_util.keystr(path)}
  assert counts == {AT_STEP}
  assert [r['lr'] for r in carried_run['rows']] == [source_run['rows'][AT_STEP]['lr']]
  assert [r['lr'] for r in carried_run['rows']] != [source_run['rows'][0]['lr']]


# ----------------------------------------------------------------------------------
# What carries over: the data position, the FLOPs and token counts
# ----------------------------------------------------------------------------------
def test_data_position_continues(source_run, upcycled_run):
  first, after = upcycled_run['batches'][0], source_run['batches'][AT_STEP]
  assert set(first) == set(after)
  for key in first:
    np.testing.assert_array_equal(first[key], after[key], err_msg=key)
  assert not np.array_equal(first['tokens'], source_run['batches'][0]['tokens'])


def test_flops_and_tokens_count_both_phases(source_run, upcycled_run):
  config, rows = upcycled_run['config'], upcycled_run['rows']
  mods = config.model.modalities
  at = saved_run.load(source_run['workdir'], AT_STEP, with_aux_routers=False).progress
  assert at['train_flops'] == source_run['rows'][AT_STEP - 1]['train_flops']
  report = flops.count(config)    # the 4t4i model's FLOPs per token from here on
  first = rows[0]
  assert first['step'] == 1
  assert first['train_flops'] == at['train_flops'] + sum(
      report.train[m] * int(first[f'batch_tokens/{m}']) for m in mods)
  # The same batch as the source's step 3: the same tokens on top of the same count.
  assert first['tokens'] == source_run['rows'][AT_STEP]['tokens']
  assert first['tokens'] > at['tokens']
  assert upcycled_run['progress']['step'] == 4
  assert upcycled_run['progress']['train_flops'] == rows[-1]['train_flops']


def test_upcycled_run_killed_at_a_random_moment_resumes_from_its_own_checkpoint(
    upcycled_run, tmp_path, capsys):
  """SIGKILLed at a random moment after its step-2 checkpoint was started, the
  upcycled run restarts from its own checkpoint (or, if that was not yet committed,
  upcycles again from the source) and logs exactly what the uninterrupted one did."""
  from test_resume import Child, assert_same_run, committed, kill_seed
  config, workdir = upcycled_run['config'], str(tmp_path / 'run')
  seed, rng = kill_seed()
  overrides = {'upcycle.from_workdir': config.upcycle.from_workdir,
               'upcycle.at_step': AT_STEP, 'model.router_noise': 'gumbel',
               'model.experts': [4, 4], 'train.steps': 4, 'train.ckpt_every': 2,
               'train.eval_every': 100}
  child = Child(config.data.data_dir, workdir, overrides)
  child.wait_for('save-done 2')
  time.sleep(rng.uniform(0, 0.2))
  assert child.signal(signal.SIGKILL)[0] == -signal.SIGKILL
  resumed = 2 in committed(workdir)
  capsys.readouterr()
  steps = []
  progress = train.train(config, workdir, on_step=steps.append)
  out = capsys.readouterr().out
  if resumed:                             # not upcycled again from the source
    assert steps == [3, 4] and '(resuming from step 2)' in out, (seed, out)
  else:
    assert steps == [1, 2, 3, 4] and 'upcycled    from' in out, (seed, out)
  assert progress == upcycled_run['progress'], seed
  rows = metrics_log.read_rows(upcycled_run['workdir'])
  assert_same_run(workdir, rows, f'seed {seed}')


# ----------------------------------------------------------------------------------
# The pure parameter map: MoD blocks, three modalities, uneven groups; its checks
# ----------------------------------------------------------------------------------
def test_upcycle_params_maps_every_group_in_mod_and_plain_layers():
  mods = ('text', 'image', 'audio')
  kw = {'num_layers': 2, 'modalities': mods, 'mod.enabled': True}
  source = tiny_config(experts=(1, 1, 1), **kw)
  target = tiny_config(experts=(2, 1, 3), **kw)
  init = lambda c, seed: jax.jit(lambda k: transformer.init(transformer.build(c), k)[0])(
      jax.random.key(seed))
  src, fresh = init(source, 1), init(target, 2)
  got = flat(upcycle.upcycle_params(src, source, fresh, target))
  src, fresh = flat(src), flat(fresh)
  slots = routing_spec.from_config(target).slots
  src_slots = routing_spec.from_config(source).slots
  for prefix in ('layer_0/block/experts', 'layer_1/experts'):   # layer 0 is MoD
    for w in ('wi_0', 'wi_1', 'wo'):
      for i in range(len(mods)):
        for s in slots[i]:
          np.testing.assert_array_equal(got[f'{prefix}/{w}'][s],
                                        src[f'{prefix}/{w}'][src_slots[i][0]])
    for m in mods:
      np.testing.assert_array_equal(got[f'{prefix}/router_{m}'], fresh[f'{prefix}/router_{m}'])
  # The mixture-of-depths router and everything else come from the source.
  np.testing.assert_array_equal(got['layer_0/router'], src['layer_0/router'])
  np.testing.assert_array_equal(got['embed/embedding'], src['embed/embedding'])


@pytest.mark.parametrize('change,expected', [
    (dict(source_experts=(2, 2)), 'is moma (2, 2); upcycling starts from a 1t1i'),
    (dict(d_model=64), 'model.d_model=32'),
    (dict(num_layers=2), 'model.num_layers=1'),
])
def test_upcycle_params_refuses_what_does_not_fit(change, expected):
  source = tiny_config(experts=change.get('source_experts', (1, 1)))
  target = tiny_config(experts=(4, 4), **{k: v for k, v in change.items()
                                          if k != 'source_experts'})
  init = lambda c: transformer.init(transformer.build(c), jax.random.key(0))[0]
  with pytest.raises(configs.ConfigError, match='upcycle.from_workdir') as info:
    upcycle.upcycle_params(init(source), source, init(target), target)
  assert expected in str(info.value)


def test_config_checks():
  c = tiny_config()
  c.upcycle.at_step = 5
  with pytest.raises(configs.ConfigError, match='upcycle.at_step: 5 is set but'):
    configs.validate(c)
  c.upcycle.from_workdir = '/some/run'
  configs.validate(c)
  c.upcycle.at_step = 0
  with pytest.raises(configs.ConfigError, match='upcycle.at_step: must be a positive'):
    configs.validate(c)
  c.upcycle.at_step, c.model.ffn, c.model.experts = 5, 'moe', (8,)
  with pytest.raises(configs.ConfigError, match='upcycle.from_workdir: upcycling makes a '
                     'MoMa model'):
    configs.validate(c)
  c = tiny_config()
  c.upcycle.optimizer = 'carry'
  with pytest.raises(configs.ConfigError, match="upcycle.optimizer: 'carry' is set but"):
    configs.validate(c)
  c.upcycle.optimizer = 'keep'
  with pytest.raises(configs.ConfigError, match='upcycle.optimizer: must be one of'):
    configs.validate(c)


# ----------------------------------------------------------------------------------
# Bad input on the command line: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------
BAD = [
    ('{tmp}/nope', AT_STEP, [], 'no such run directory'),
    ('{big}', AT_STEP, [], 'is moma (4, 4); upcycling starts from a 1t1i MoMa run'),
    ('{src}', 7, [], 'has no checkpoint of step 7; it has 2, 3'),
    ('{src}', 0, [], 'upcycle.at_step: must be a positive integer, got 0'),
    ('{src}', AT_STEP, ['--config.model.d_model=64'], 'has model.d_model=32, this run 64'),
    ('{src}', AT_STEP, ['--config.data.seq_len=32'], 'trained on other data'),
    ('{src}', AT_STEP, ['--config.upcycle.optimizer=carry', '--config.train.lr=0.5'],
     "upcycle.optimizer: 'carry' continues the source's schedule, but"),
    ('{src}', AT_STEP, ['--config.upcycle.optimizer=carry', '--config.train.lr=0.003',
                        '--config.train.warmup=5'],
     "schedule of 3 steps, but step 2 + train.steps=4 ends at 6"),
]


@pytest.mark.parametrize('source,at_step,extra,expected', BAD)
def test_bad_upcycle_source_exits_2_and_writes_nothing(source_run, upcycled_run, tmp_path,
                                                       capsys, source, at_step, extra,
                                                       expected):
  source = source.format(tmp=tmp_path, src=source_run['workdir'], big=upcycled_run['workdir'])
  before = [snapshot(r['workdir']) for r in (source_run, upcycled_run)]
  workdir = tmp_path / 'new'
  t = source_run['config'].train
  argv = ['moma-train', f'--config={QUICKSTART}', f'--workdir={workdir}',
          f'--config.data.data_dir={source_run["config"].data.data_dir}',
          '--config.data.vq.fit_images=600', '--config.model.d_model=32',
          '--config.model.num_layers=2', '--config.model.ffn_dim=128',
          '--config.model.max_len=64', '--config.data.seq_len=64',
          f'--config.train.batch_size={t.batch_size}', '--config.train.steps=4',
          f'--config.upcycle.from_workdir={source}', f'--config.upcycle.at_step={at_step}',
          '--config.model.router_noise=gumbel', *extra]
  assert expected in train_usage_error(argv, capsys)
  assert not workdir.exists()
  assert [snapshot(r['workdir']) for r in (source_run, upcycled_run)] == before
