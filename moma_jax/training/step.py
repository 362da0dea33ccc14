"""The training step: gradients (accumulated over micro-batches) and a guarded AdamW update.

`make_train_step(model, tx, config, shardings)` -> jit'd (state, batch, step) ->
(state, metrics). The state argument is donated: the new parameters and optimizer
moments are written into the old ones' buffers, so a step holds one state on the
devices, not two. It builds nothing concrete (its router-noise key is made inside the
step), so it also compiles ahead of time from abstract inputs for other devices
(moma_jax/compilation/aot.py, which compiles this very function). The loop around it is
moma_jax/training/trainer.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from moma_jax.model import route_stats
from moma_jax.model import names
from moma_jax.model import transformer
from moma_jax.training import optimizer as optimizer_lib


def make_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    shardings: tuple[Any, Any] | None = None):
  """(state, batch, step) -> (state, metrics), jit'd.

  shardings: (state's, batch's) under a mesh, the state's as `train_state.formats` gives
  them (the trainer's: its expert arrays row-major), which the state must be in
  (`train_state.place`); the metrics come back replicated. Trace and run it under that
  mesh and `sharding.axis_rules()`.

  state: {'params', 'opt': optimizer state}. batch: dict of [B, L] arrays. step: int32
  scalar, the 1-based step (its router noise key is `noise_key(config, step)`, so a
  resumed run draws the same noise). A non-finite loss or gradient leaves the state as it
  was; metrics['finite'] says which happened, and metrics['update_count'] is the
  optimizer's own count of updates applied before this one, the count its learning-rate
  schedule read (a skipped update leaves it where it was).

  The caller's `state` is donated: its arrays are deleted once the step runs. Whatever
  must read them (a checkpoint, an evaluation) does so before the next step is called;
  `Checkpoints.save` returns once it has copied the arrays to the host.
  """
  def step_fn(state, batch, step):
    # Made inside the step: a key built at construction would be a concrete array on
    # the default device, which an AOT compile for device-less TPU or GPU cannot take.
    rng = noise_key(config, step)
    value, metrics, grads = _gradients(model, config, state['params'], batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    with jax.named_scope(names.OPTIMIZER):
      updates, opt = tx.update(grads, state['opt'], state['params'])
      new = {'params': optax.apply_updates(state['params'], updates), 'opt': opt}
      # The optimizer's own count of applied updates, which its schedule read.
      count = optimizer_lib.update_count(state['opt'])
      state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics.update(route_stats.router_grad_norms(grads))
    metrics.update({names.GRAD_NORM: grad_norm, 'finite': finite, 'update_count': count})
    return state, metrics

  if shardings is None:
    return jax.jit(step_fn, donate_argnums=0)
  state_sh, batch_sh = shardings
  replicated = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, None),
                 out_shardings=(state_sh, replicated), donate_argnums=0)


def noise_key(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The router-noise key of 1-based training step `step` (int32 scalar): a function of
  `train.seed` and the step alone, so a resumed run draws the noise it would have."""
  return jax.random.fold_in(jax.random.key(config.train.seed + 1), step)


def _gradients(model, config, params, batch, rng):
  """(mean loss, metrics, gradients) of a batch, accumulated over `train.grad_accum`
  micro-batches of whole routing groups ([B, L] -> [A, B/A, L], checked up front)."""
  def grads_of(batch, rng):
    def objective(p):
      return transformer.loss_fn(model, p, batch, rng, config.train.z_loss)
    return jax.value_and_grad(objective, has_aux=True)(params)

  accum = config.train.grad_accum
  if accum == 1:
    (value, metrics), grads = grads_of(batch, rng)
    return value, metrics, grads
  micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
  def one(carry, mb_and_i):
    mb, i = mb_and_i
    (v, m), g = grads_of(mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (v, g)), m
  zero = (jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
  (value, grads), ms = jax.lax.scan(one, zero, (micro, jnp.arange(accum)))
  value, grads = value / accum, jax.tree.map(lambda g: g / accum, grads)
  return value, _merge_micro(ms, config.model.modalities), grads


def _merge_micro(ms: Mapping[str, jax.Array], modalities) -> dict[str, jax.Array]:
  """Metrics of A micro-batches ([A, ...] leaves) -> one batch's: token-weighted losses,
  summed token counts, other statistics averaged."""
  out = {k: jnp.mean(v, axis=0) for k, v in ms.items()}
  pairs = [(names.LOSS_METRIC, names.TOKENS)] + [
      (names.per_modality(names.LOSS_METRIC, m), names.per_modality(names.TOKENS, m))
      for m in modalities]
  for loss, tokens in pairs:
    out[tokens] = ms[tokens].sum(0)
    out[loss] = (ms[loss] * ms[tokens]).sum(0) / jnp.maximum(out[tokens], 1)
  return out
