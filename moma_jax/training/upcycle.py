"""Upcycling: a 1t1i MoMa run's step N becomes the start of an n t m i MoMa run.

The paper's recipe (Lin et al. 2024, section on upcycling; docs/design.md §1): train MoMa
with one expert per modality (`model.experts=(1, 1)`), then at step N copy each
modality's FFN into every expert of that modality's group of the larger model, add fresh
routers, restart the optimizer state and the LR schedule, and keep the data position.
`upcycle.optimizer='carry'` continues the source's optimizer instead (a control of the
recipe): each expert's AdamW moments are its source FFN's, the routers' are 0, and the
update count, which the LR schedule reads, goes on from `at_step`.
The FLOPs count continues, so a FLOPs-savings curve of the upcycled run counts both
phases.

  moma-train --config experiments/quickstart.py:moma_4t4i --workdir runs/big \
      --config.upcycle.from_workdir=runs/small_1t1i --config.upcycle.at_step=100 \
      --config.model.router_noise=gumbel

Identical copies of one FFN would stay identical under expert choice if their routers
scored tokens alike; the paper breaks the tie with Gumbel-sigmoid router noise,
`sigmoid(z + G' - G'')` (`model.router_noise='gumbel'`). It is not forced here (a run
may want to measure without it) but the experiments and tests set it.

What the target takes from where:
  experts' wi_0, wi_1, wo     the source's single expert of the same modality, in every
                              expert of the group (stack order: `RoutingSpec.slots`);
  expert-group routers and    a fresh initialization of the target (its `train.seed`):
  every auxiliary router      the routing they learn is the new model's;
  everything else             the source, unchanged (embeddings, attention, norms,
                              output head, mixture-of-depths routers).
The optimizer state: `tx.init` (restart), or (carry) the source's moments through the
same map, fresh routers' moments 0, the source's update count.
Progress: `train_flops`, `tokens` and the data position of the source at step N; the
new run counts its own steps from 0 and its own non-finite steps from 0.

The trainer calls `check_source` before it writes anything (files only), then
`initial_state` on its mesh: the source's parameters read sharded (never its optimizer
state), the map jit'd with the new state's out_shardings, so a model larger than one
device, or one host, upcycles as it trains.

Axis legend: E experts of all groups (stacked), D embed, F SwiGLU hidden.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moma_jax import configs
from moma_jax.model import param_names
from moma_jax.model import routing_spec
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import saved
from moma_jax.runs import state as train_state
from moma_jax.training import optimizer as optimizer_lib

FIELD = 'upcycle.from_workdir'
# Model fields that shape the parameters the target copies from the source.
_SAME_MODEL = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'ffn_dim', 'modalities',
               'param_dtype')
# Data fields that may differ: where the data lives, and what evaluation reads.
_DATA_FREE = ('data_dir', 'eval_split')
# Training fields a carried optimizer's schedule and update rule must share.
_CARRIED_TRAIN = ('lr', 'warmup', 'schedule', 'weight_decay', 'clip')


# ----------------------------------------------------------------------------------
# Checks: the source must be a 1t1i MoMa run the target can grow from
# ----------------------------------------------------------------------------------
def check_compatible(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict,
                     where: str = 'the source run') -> None:
  """Raises ConfigError('upcycle.from_workdir', ...) unless `target` can be upcycled from
  `source`: both MoMa over the same modalities, the source with one expert per modality,
  the same parameter shapes outside the experts, the same data stream and batch (so
  that its data position carries over)."""
  s, t = source.model, target.model
  if s.ffn != 'moma' or any(int(e) != 1 for e in s.experts):
    ffn = configs.ffn_label(s)
    raise configs.ConfigError(FIELD, f'{where} is {ffn}; upcycling starts from a 1t1i '
                              'MoMa run (model.ffn=moma, one expert per modality)')
  if t.ffn != 'moma':
    raise configs.ConfigError(FIELD, f'upcycling makes a MoMa model, got model.ffn={t.ffn}')
  for name in _SAME_MODEL:
    if configs.first_difference(source, target, [f'model.{name}']) is None:
      continue
    raise configs.ConfigError(FIELD, f'{where} has model.{name}={s[name]!r}, this run '
                              f'{t[name]!r}; upcycling keeps every non-expert shape')
  for label, a, b in [('model.ffn_hidden', configs.ffn_hidden(s), configs.ffn_hidden(t)),
                      ('mixture-of-depths layers', configs.mod_layers(s),
                       configs.mod_layers(t)),
                      ('train.batch_size', source.train.batch_size, target.train.batch_size)]:
    if a != b:
      raise configs.ConfigError(FIELD, f'{where} has {label} {a}, this run {b}')
  data = {*source.data.keys(), *target.data.keys()} - set(_DATA_FREE)
  if configs.first_difference(source, target, sorted(f'data.{k}' for k in data)):
    raise configs.ConfigError(FIELD, f'{where} trained on other data (data.* differs); its '
                              'data position carries over only to the same data stream')
  if target.upcycle.optimizer == 'carry':
    _check_carry(source, target, where)


def _check_carry(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict,
                 where: str) -> None:
  """A carried optimizer continues the source's schedule: the same update rule and a
  horizon that ends where the source's did."""
  field = 'upcycle.optimizer'
  for name in _CARRIED_TRAIN:
    a, b = source.train[name], target.train[name]
    if a != b:
      raise configs.ConfigError(field, f"'carry' continues the source's schedule, but "
                                f'{where} has train.{name}={a!r}, this run {b!r}')
  at, steps = target.upcycle.at_step, target.train.steps
  if source.train.steps != at + steps:
    raise configs.ConfigError(field, f"'carry' continues the source's schedule of "
                              f'{source.train.steps} steps, but step {at} + train.steps='
                              f'{steps} ends at {at + steps}')


# ----------------------------------------------------------------------------------
# The parameter map (pure)
# ----------------------------------------------------------------------------------
def _is_fresh(path: tuple[str, ...]) -> bool:
  """Routers the target learns anew: expert-group routers, every auxiliary router."""
  return param_names.role(path) in ('expert_router', 'aux_router')


def expert_sources(source: ml_collections.ConfigDict,
                   target: ml_collections.ConfigDict) -> np.ndarray:
  """index[s]: the source stack position each target stack position s copies, [E_target].

  Expert j of group i of the target (stack position `RoutingSpec.slots[i][j]` of the target)
  copies the one expert of group i of the source (its `slots[i][0]`).
  """
  src_slots = routing_spec.from_config(source).slots
  dst_slots = routing_spec.from_config(target).slots
  index = np.zeros(sum(map(len, dst_slots)), np.int32)
  for i, row in enumerate(dst_slots):
    index[list(row)] = src_slots[i][0]
  return index


def upcycle_params(source_params: Any, source: ml_collections.ConfigDict,
                   fresh_params: Any, target: ml_collections.ConfigDict) -> Any:
  """The target's parameters grown from a 1t1i source's (nothing is modified in place).

  source_params: the source model's parameters (experts wi_0, wi_1 [M, D, F], wo
    [M, F, D], M modalities). fresh_params: a fresh initialization of the target model:
    the structure of the result and its routers (wi_0, wi_1 [E, D, F], wo [E, F, D]).
  Raises ConfigError if the configs do not fit (`check_compatible`) or a copied
  parameter is missing from the source or has another shape there.
  """
  check_compatible(source, target)
  flat_source = {param_names.names(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      source_params)[0]}
  index = expert_sources(source, target)

  def one(keys, fresh):
    path = param_names.names(keys)
    if _is_fresh(path):
      return fresh
    name = '/'.join(path)
    if path not in flat_source:
      raise configs.ConfigError(FIELD, f'the source run has no parameter {name}')
    value = jnp.asarray(flat_source[path], fresh.dtype)
    if param_names.role(path) == 'expert':
      value = jnp.take(value, index, axis=0)          # [M, ...] -> [E, ...]
    if value.shape != fresh.shape:
      raise configs.ConfigError(FIELD, f'parameter {name} would be {value.shape} from the '
                                f'source run but is {fresh.shape} here')
    return value

  return jax.tree_util.tree_map_with_path(one, fresh_params)


def carry_optimizer(source_opt: Any, source: ml_collections.ConfigDict, fresh_opt: Any,
                    target: ml_collections.ConfigDict) -> Any:
  """The target's optimizer state continued from a 1t1i source's (`upcycle.optimizer=
  'carry'`): AdamW's first and second moments (`mu`, `nu`, trees shaped as the
  parameters) through `upcycle_params`, so each expert starts with its source FFN's and
  a fresh router with `fresh_opt`'s zeros; every update count is the source's.
  source_opt / fresh_opt: `optimizer(source)` / `optimizer(target)` states (fresh_opt
  from `tx.init`: the structure of the result)."""
  moments = {key: upcycle_params(optax.tree_utils.tree_get(source_opt, key), source,
                                 optax.tree_utils.tree_get(fresh_opt, key), target)
             for key in ('mu', 'nu')}
  return optax.tree_utils.tree_set(fresh_opt, **moments,
                                   count=optimizer_lib.update_count(source_opt))


# ----------------------------------------------------------------------------------
# The start of an upcycled training run
# ----------------------------------------------------------------------------------
def check_source(config: ml_collections.ConfigDict) -> None:
  """Everything about `upcycle.from_workdir` / `upcycle.at_step` that the user can get
  wrong, checked from the source's config.json and checkpoint list (no array is read).
  Raises run_dir.RunDirError (no such run or step) or ConfigError (a source that does
  not fit: `check_compatible`)."""
  u = config.upcycle
  workdir, source, step = saved.locate(u.from_workdir, u.at_step)
  check_compatible(source, config, where=f'{workdir} (step {step})')


def initial_state(config: ml_collections.ConfigDict, tx, model: transformer.Decoder,
                  state_shardings: Mapping[str, Any], mesh: jax.sharding.Mesh
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(state, progress) that an upcycled run starts from, instead of a fresh init.

  config: the target run's (with `upcycle.from_workdir`, `upcycle.at_step`). tx: its
  optimizer. model: its decoder (`transformer.build(config)`). state_shardings: the
  state's ({'params', 'opt'}) on `mesh`, where everything is built (shardings, or the
  training step's `train_state.formats`).
  state: {'params': upcycled, 'opt': tx.init of them} (Adam moments 0, count 0, so the
  LR schedule restarts), or with `upcycle.optimizer='carry'` the source's optimizer
  state through `carry_optimizer`; routers from the target's own init for `train.seed`,
  the same values `train_state.create` gives them. progress: step 0, the source's
  `train_flops`, `tokens` and `data` (the position of every row of the global batch) at
  `upcycle.at_step`. Raises as `check_source` does, before any array is read.

  Every array is made where it ends up, shard by shard: the source's parameters are
  read sharded (its optimizer state only to carry it), the fresh init is jit'd with the
  parameters' out_shardings, and the copy too; neither outlives this call. No process
  holds more than its shards.
  """
  u = config.upcycle
  carry = u.optimizer == 'carry'

  def source_layout(source: ml_collections.ConfigDict) -> dict[str, Any]:
    """What to read of the source: its parameters, and its optimizer state to carry."""
    where = f'{os.path.abspath(os.path.expanduser(u.from_workdir))} (step {u.at_step})'
    check_compatible(source, config, where=where)
    model = transformer.build(source)
    if not carry:
      return {'params': train_state.abstract_params(model, mesh)}
    with sharding.outside_mesh():      # as the trainer lays out its own state
      return train_state.layout(model, optimizer_lib.optimizer(source), mesh)[0]

  _, source, _, source_state, source_progress = saved.read_state(
      u.from_workdir, u.at_step, source_layout)
  params_sh = state_shardings['params']
  with sharding.outside_mesh():
    fresh = jax.jit(lambda rng: nn.unbox(transformer.init_boxed(model, rng)),
                    out_shardings=params_sh)(jax.random.key(config.train.seed))
  # The fresh arrays are donated: each is the buffer of the parameter that replaces it.
  grow = jax.jit(functools.partial(upcycle_params, source=source, target=config),
                 out_shardings=params_sh, donate_argnames='fresh_params')
  params = grow(source_state['params'], fresh_params=fresh)
  opt = jax.jit(tx.init, out_shardings=state_shardings['opt'])(params)
  if carry:
    opt = jax.jit(functools.partial(carry_optimizer, source=source, target=config),
                  out_shardings=state_shardings['opt'], donate_argnames='fresh_opt')(
                      source_state['opt'], fresh_opt=opt)
  progress = dict(step=0, train_flops=float(source_progress['train_flops']),
                  tokens=int(source_progress['tokens']), nonfinite_skipped=0,
                  nonfinite_in_a_row=0, data=source_progress['data'])
  return {'params': params, 'opt': opt}, progress
