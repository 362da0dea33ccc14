"""Configuration schema, defaults and validation.

One `ml_collections.ConfigDict` describes a run. `default_config()` holds every field
with its default; experiment files (`experiments/*.py`, `get_config(arg)`) start from it
and change what they need. `validate(config)` checks the whole thing and raises
`ConfigError` naming the offending field, so a command-line tool can print one line.

Field reference (the names other parts rely on):
  model.ffn        'dense' | 'moma' (one expert group per modality) | 'moe' (expert choice
                   over all tokens) | 'topk' (token choice with a capacity factor).
  model.experts    experts per group: one entry per modality for moma ((1, 1) is 1t1i,
                   (4, 4) is 4t4i), one entry for moe/topk ((8,) is moe_8x).
  model.capacity   per group, the fraction c of the group's tokens each expert takes;
                   None means 1/E for every group; a 1-tuple applies to all groups.
  model.mod.*      mixture-of-depths: capacity c_d, layer pattern (every, first).
  model.kernels, model.attention
                   the backends of routing and attention, 'auto' per platform
                   (moma_jax/model/kernels.py).
  model.matmul_tiles  megablox's tiles on TPU: 'auto' (chosen for the shapes,
                   pallas_kernels/megablox_tiles.py) or 'TMxTKxTN' (`matmul_tiles()`).
  model.remat      what each layer keeps for the backward pass (moma_jax/model/remat.py).
  routing.*        routing group size and row layout (see moma_jax/model/routing.py).
  upcycle.*        from_workdir: a 1t1i MoMa run whose step `at_step` (> 0) a new run
                   starts from, its FFNs copied into every expert (moma_jax/training/upcycle.py).
"""
from __future__ import annotations

import json
import re
from typing import Any, Collection, Iterable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from moma_jax import renamed_fields

FFN_KINDS = ('dense', 'moma', 'moe', 'topk')
LAYOUTS = ('ragged', 'capacity')
# Resolved per platform by moma_jax/model/kernels.py; remat: moma_jax/model/remat.py.
KERNELS = ('auto', 'xla', 'pallas')
ATTENTION = ('auto', 'xla', 'splash', 'flash', 'cudnn', 'tokamax')
REMAT = ('none', 'block_input', 'matmuls', 'block_outputs', 'offload')


class ConfigError(ValueError):
  """An impossible configuration; the message starts with the field's dotted name."""

  def __init__(self, field: str, message: str):
    super().__init__(f'{field}: {message}')
    self.field = field


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


def _model_defaults() -> ml_collections.ConfigDict:
  """`config.model`: the network, its experts and routers, kernels and dtypes."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 773                    # 5 specials + 256 bytes + 512 VQ codes
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.ffn_dim = 256                       # the paper's ffn; SwiGLU hidden is 2/3 of it
  m.ffn_hidden = config_dict.placeholder(int)  # None = round(2/3 * ffn_dim)
  m.max_len = 128
  m.modalities = ('text', 'image')
  m.ffn = 'moma'
  m.experts = (4, 4)
  m.capacity = config_dict.placeholder(tuple)
  m.top_k = 2                           # topk only
  m.topk_capacity_factor = 1.25         # topk only: per-expert buffer = cf * k * N / E
  m.load_balance_weight = 0.01          # topk only
  m.router = 'sigmoid'
  m.router_noise = 'none'
  m.norm = 'post'
  m.mod = ml_collections.ConfigDict(dict(
      enabled=False, capacity=0.25, every=2, first=0, modality_aware=False))
  # Auxiliary routers for causal inference. 'joint' (with enabled=True): trained alongside
  # the model on stop-gradient inputs. 'post_hoc' (the paper's): trained after the model
  # by `moma-aux`, whatever `enabled` says; the training run carries none.
  m.aux_router = ml_collections.ConfigDict(dict(enabled=False, mode='post_hoc'))
  m.kernels = 'auto'                    # 'auto' | 'xla' | 'pallas': moma_jax/model/kernels.py
  m.attention = 'auto'                  # one of ATTENTION: moma_jax/model/kernels.py
  m.matmul_tiles = 'auto'               # TPU grouped matmul tiles: 'auto' (chosen for the
                                        # shapes, pallas_kernels/megablox_tiles.py) or TMxTKxTN
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  m.remat = 'none'                      # what a layer keeps for backward: moma_jax/model/remat.py
  return m


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default: a tiny 4t4i MoMa that runs on a CPU."""
  c = ml_collections.ConfigDict()
  # True: shrink the experiment to run in minutes on a CPU (see `shrink_for_cpu`).
  c.runlocal = False

  c.model = _model_defaults()

  c.routing = ml_collections.ConfigDict(dict(
      group_size=8,
      layout='ragged',
      buffer_factor=1.0,
      expected_fraction=config_dict.placeholder(tuple),
      # Expert parallelism's per-expert buffer: None = exact (nothing cut), or a factor
      # on the rows an expert expects (moma_jax/model/expert_parallel.py).
      ep_buffer_factor=config_dict.placeholder(float),
  ))

  c.data = ml_collections.ConfigDict(dict(
      # A dataset name, or 'mixture' for the weighted `mixture` of several.
      name='mixture',
      mixture='moma_shapes:0.4,moma_digits:0.3,moma_pydoc:0.3',
      # Builder options of embedded datasets, 'name:key=value[:key=value];name2:...',
      # e.g. 'moma_shapes:num_train=100000' for more scenes (built on first use).
      options='',
      seq_len=128,
      data_dir=config_dict.placeholder(str),   # None: ~/.cache/moma_jax/data
      eval_split='validation',
      # Documents made of image-text examples: caption then image, image then caption,
      # several images interleaved with their captions (proportions).
      formats=(0.4, 0.4, 0.2),
      images_per_interleaved=3,
      text_tokenizer='bytes',                  # or a SentencePiece .model path
      vq=ml_collections.ConfigDict(dict(codebook_size=512, patch=4, seed=0,
                                        fit_images=4000)),
      seed=0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, steps=200, lr=1e-3, warmup=20, schedule='linear',
      weight_decay=0.1, clip=1.0, z_loss=1e-5, grad_accum=1, seed=0,
      log_every=10, eval_every=100, ckpt_every=100, keep=3, max_nonfinite=10,
      # Evaluation reads at most this many batches per dataset (None: the whole split).
      eval_max_batches=config_dict.placeholder(int),
      # Batches made and placed on the devices ahead of the step (0: made when needed).
      prefetch=2))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.upcycle = ml_collections.ConfigDict(dict(
      from_workdir=config_dict.placeholder(str), at_step=0))
  return c


def shrink_for_cpu(config: ml_collections.ConfigDict,
                   keep: Collection[str] = ()) -> ml_collections.ConfigDict:
  """`runlocal=True`: the same kind of model (FFN kind, experts, capacities, MoD pattern)
  at d_model 64 and at most 4 layers, on the embedded data's vocabulary, for 100 short
  steps, so a paper-size experiment runs on a laptop CPU. Fields named in `keep` (the
  command line's own overrides) are left as they are. Changes `config` in place."""
  m = config.model
  group = min(config.routing.group_size, 8)
  layers = min(m.num_layers, 4 if m.mod.enabled else 2)
  small = {
      'model.d_model': 64, 'model.num_heads': 4, 'model.ffn_dim': 256,
      'model.ffn_hidden': None, 'model.num_layers': layers,
      'model.mod.first': min(m.mod.first, layers - 1),
      'model.vocab_size': default_config().model.vocab_size,
      'model.max_len': 128, 'data.seq_len': 128, 'routing.group_size': group,
      'train.batch_size': 2 * group, 'train.grad_accum': 1, 'train.steps': 100,
      'train.warmup': 10, 'train.lr': 1e-3, 'train.log_every': 5,
      'train.eval_every': 50, 'train.ckpt_every': 50, 'train.eval_max_batches': 4}
  for path, value in small.items():
    if path not in keep:
      *parents, leaf = path.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


# ----------------------------------------------------------------------------------
# Derived model sizes (routing's own: moma_jax/model/routing_spec.py)
# ----------------------------------------------------------------------------------
def ffn_hidden(model: ml_collections.ConfigDict) -> int:
  """SwiGLU hidden width: `model.ffn_hidden`, or round(2/3 * ffn_dim)."""
  if model.ffn_hidden is not None:
    return int(model.ffn_hidden)
  return max(1, int(round(2 * model.ffn_dim / 3)))


def ffn_label(model: ml_collections.ConfigDict) -> str:
  """The FFN kind for people: 'dense', or the kind and its experts, 'moma (4, 4)'."""
  return model.ffn if model.ffn == 'dense' else f'{model.ffn} {tuple(model.experts)}'


def mod_layers(model: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """For each layer, whether it is a mixture-of-depths layer."""
  mod = model.mod
  if not mod.enabled:
    return (False,) * model.num_layers
  return tuple(i >= mod.first and (i - mod.first) % mod.every == 0
               for i in range(model.num_layers))


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
def _positive(path: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(path, f'must be a positive integer, got {value!r}')


_TILES = re.compile(r'(\d+)x(\d+)x(\d+)')


def matmul_tiles(m: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
  """`model.matmul_tiles` as (TM, TK, TN), None for 'auto'. TPU blocks: TM a multiple
  of 16 (bf16 packs two rows a sublane), TK and TN of 128 (lanes)."""
  text = m.get('matmul_tiles', 'auto')
  if text == 'auto':
    return None
  found = _TILES.fullmatch(str(text))
  tiles = tuple(int(g) for g in found.groups()) if found else None
  if tiles is None or not tiles[0] or tiles[0] % 16 or tiles[1] % 128 or tiles[2] % 128:
    raise ConfigError('model.matmul_tiles', "must be 'auto' or TMxTKxTN with TM a positive "
                      f'multiple of 16 and TK, TN of 128 (e.g. 512x512x1024), got {text!r}')
  return tiles


def _one_of(path: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ConfigError(path, f'must be one of {", ".join(map(repr, allowed))}, got {value!r}')


def _in_unit(path: str, value) -> None:
  if not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ConfigError(path, f'must be in (0, 1], got {value!r}')


def looks_ahead(model: ml_collections.ConfigDict) -> bool:
  """Whether teacher-forced routing compares tokens of a routing group (expert choice
  or MoD), so that causal inference needs auxiliary routers."""
  return model.ffn in ('moma', 'moe') or bool(model.mod.enabled)


def has_joint_aux_routers(model: ml_collections.ConfigDict) -> bool:
  """Whether the training run itself carries (and trains) auxiliary routers."""
  a = model.aux_router
  return bool(a.enabled and a.mode == 'joint' and looks_ahead(model))


def _validate_model(m: ml_collections.ConfigDict) -> None:
  """ConfigError for a `config.model` that cannot describe a model."""
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'ffn_dim', 'max_len'):
    _positive(f'model.{name}', m[name])
  if m.ffn_hidden is not None:
    _positive('model.ffn_hidden', m.ffn_hidden)
  if m.d_model % m.num_heads:
    raise ConfigError('model.num_heads', f'{m.num_heads} heads do not divide d_model={m.d_model}')
  if (m.d_model // m.num_heads) % 2:
    raise ConfigError('model.num_heads', 'head dimension d_model/num_heads must be even (RoPE)')
  if not m.modalities or len(set(m.modalities)) != len(m.modalities):
    raise ConfigError('model.modalities', f'must be distinct names, got {m.modalities!r}')
  if len(m.modalities) > 127:
    raise ConfigError('model.modalities', 'at most 127 modalities (stored as int8)')
  _one_of('model.ffn', m.ffn, FFN_KINDS)
  _one_of('model.router', m.router, ('sigmoid', 'softmax'))
  _one_of('model.router_noise', m.router_noise, ('none', 'gumbel'))
  _one_of('model.norm', m.norm, ('post', 'pre'))
  _one_of('model.kernels', m.kernels, KERNELS)
  _one_of('model.attention', m.attention, ATTENTION)
  matmul_tiles(m)
  _one_of('model.dtype', m.dtype, ('float32', 'bfloat16'))
  _one_of('model.param_dtype', m.param_dtype, ('float32', 'bfloat16'))
  _one_of('model.remat', m.remat, REMAT)
  _one_of('model.aux_router.mode', m.aux_router.mode, ('post_hoc', 'joint'))
  if m.aux_router.enabled and m.ffn in ('dense', 'topk') and not m.mod.enabled:
    raise ConfigError('model.aux_router.enabled', f'a {m.ffn} model without mixture-of-'
                      'depths routes causally already; it has no auxiliary routers')

  for cap in m.capacity or ():
    _in_unit('model.capacity', cap)
  if m.ffn != 'dense':
    experts = tuple(m.experts)
    want = len(m.modalities) if m.ffn == 'moma' else 1
    if len(experts) != want:
      raise ConfigError('model.experts', f'{m.ffn} needs {want} entr{"y" if want == 1 else "ies"}'
                        f' (one per {"modality" if m.ffn == "moma" else "layer"}), got {experts!r}')
    for e in experts:
      _positive('model.experts', e)
    n_groups = len(m.modalities) if m.ffn == 'moma' else 1
    if m.capacity is not None and len(m.capacity) not in (1, n_groups):
      raise ConfigError('model.capacity', f'needs 1 or {n_groups} entries, got {m.capacity!r}')
    if m.ffn == 'topk':
      _positive('model.top_k', m.top_k)
      if m.top_k > experts[0]:
        raise ConfigError('model.top_k', f'{m.top_k} exceeds the {experts[0]} experts')
      if not m.topk_capacity_factor > 0:
        raise ConfigError('model.topk_capacity_factor',
                          f'must be > 0, got {m.topk_capacity_factor}')
  if m.mod.enabled:
    _in_unit('model.mod.capacity', m.mod.capacity)
    _positive('model.mod.every', m.mod.every)
    if not isinstance(m.mod.first, int) or not 0 <= m.mod.first < m.num_layers:
      raise ConfigError('model.mod.first', f'must be a layer index in [0, {m.num_layers}), got {m.mod.first!r}')


def _validate_routing(r: ml_collections.ConfigDict, m: ml_collections.ConfigDict) -> None:
  """ConfigError for `config.routing` values the model `m` cannot route by."""
  _positive('routing.group_size', r.group_size)
  _one_of('routing.layout', r.layout, LAYOUTS)
  if not r.buffer_factor > 0:
    raise ConfigError('routing.buffer_factor', f'must be > 0, got {r.buffer_factor}')
  if r.ep_buffer_factor is not None and not r.ep_buffer_factor > 0:
    raise ConfigError('routing.ep_buffer_factor', f'must be > 0 or None (exact), got '
                      f'{r.ep_buffer_factor}')
  if r.expected_fraction is not None:
    if len(r.expected_fraction) != len(m.modalities):
      raise ConfigError('routing.expected_fraction', 'needs one entry per modality')
    for f in r.expected_fraction:
      _in_unit('routing.expected_fraction', f)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError (naming the field) if `config` cannot describe a model; returns it."""
  try:
    renamed_fields.refuse(renamed_fields.fields(config.to_dict()))
  except renamed_fields.RenamedFieldError as e:
    raise ConfigError(e.field, e.message) from None
  m, r = config.model, config.routing
  _validate_model(m)
  _validate_routing(r, m)

  t = config.train
  if t.z_loss < 0:
    raise ConfigError('train.z_loss', f'must be >= 0, got {t.z_loss}')
  for name in ('batch_size', 'steps', 'grad_accum'):
    _positive(f'train.{name}', t[name])
  if t.batch_size % r.group_size:
    raise ConfigError('train.batch_size', f'{t.batch_size} is not a multiple of '
                      f'routing.group_size={r.group_size}')
  _positive('data.seq_len', config.data.seq_len)
  if config.data.seq_len > m.max_len:
    raise ConfigError('data.seq_len', f'{config.data.seq_len} exceeds model.max_len={m.max_len}')

  # What fits the source run is checked when it is read (moma_jax/training/upcycle.py).
  u = config.upcycle
  if u.from_workdir is not None:
    if not u.from_workdir:
      raise ConfigError('upcycle.from_workdir', 'must name a training run directory')
    _positive('upcycle.at_step', u.at_step)
    if m.ffn != 'moma':
      raise ConfigError('upcycle.from_workdir', f'upcycling makes a MoMa model, got '
                        f'model.ffn={m.ffn}')
  elif u.at_step:
    raise ConfigError('upcycle.at_step', f'{u.at_step!r} is set but upcycle.from_workdir '
                      'is not')
  return config
