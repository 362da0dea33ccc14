"""The training step: gradients (accumulated over micro-batches) and a guarded AdamW update.

`make_train_step(model, tx, config, shardings)` -> jit'd (state, batch, step, poison) ->
(state, metrics). It builds nothing concrete (its router-noise key is made inside the
step), so it also compiles ahead of time from abstract inputs for other devices
(moma_jax/analysis/aot.py). The loop around it is moma_jax/training/trainer.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from moma_jax.model import route_stats
from moma_jax.model import transformer


def make_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    shardings: tuple[Any, Any] | None = None):
  """(state, batch, step, poison) -> (state, metrics), jit'd.

  shardings: (state's, batch's) under a mesh; the metrics come back replicated. Trace
  and run it under that mesh and `sharding.axis_rules()`.

  state: {'params', 'opt': optimizer state}. batch: dict of [B, L] arrays. step: int32
  scalar, the 1-based step (its router noise key is fold_in(seed, step), so a resumed run
  draws the same noise). poison: float32 scalar multiplying the loss (1, or NaN to
  exercise the non-finite path). A non-finite loss or gradient leaves the state as it
  was; metrics['finite'] says which happened.
  """
  accum = config.train.grad_accum
  seed = config.train.seed + 1

  def grads_of(params, batch, rng, poison):
    def objective(p):
      value, metrics = transformer.loss_fn(model, p, batch, rng)
      # An injected NaN shows in the logged loss too, as a real one would.
      return value * poison, {**metrics, 'loss': metrics['loss'] * poison}
    return jax.value_and_grad(objective, has_aux=True)(params)

  def step_fn(state, batch, step, poison):
    # Made inside the step: a key built at construction would be a concrete array on
    # the default device, which an AOT compile for device-less TPU or GPU cannot take.
    rng = jax.random.fold_in(jax.random.key(seed), step)
    if accum == 1:
      (value, metrics), grads = grads_of(state['params'], batch, rng, poison)
    else:
      # [B, L] -> [A, B/A, L]: whole routing groups per micro-batch (checked up front).
      micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
      def one(carry, mb_and_i):
        mb, i = mb_and_i
        (v, m), g = grads_of(state['params'], mb, jax.random.fold_in(rng, i), poison)
        return jax.tree.map(jnp.add, carry, (v, g)), m
      zero = (jnp.float32(0), jax.tree.map(jnp.zeros_like, state['params']))
      (value, grads), ms = jax.lax.scan(one, zero, (micro, jnp.arange(accum)))
      value, grads = value / accum, jax.tree.map(lambda g: g / accum, grads)
      metrics = _merge_micro(ms, config.model.modalities)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    new = {'params': optax.apply_updates(state['params'], updates), 'opt': opt}
    state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics.update(route_stats.router_grad_norms(grads))
    metrics.update(grad_norm=grad_norm, finite=finite)
    return state, metrics

  # No buffer donation: an asynchronous checkpoint may still be reading the old state.
  if shardings is None:
    return jax.jit(step_fn)
  state_sh, batch_sh = shardings
  replicated = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, None, None),
                 out_shardings=(state_sh, replicated))


def _merge_micro(ms: Mapping[str, jax.Array], modalities) -> dict[str, jax.Array]:
  """Metrics of A micro-batches ([A, ...] leaves) -> one batch's: token-weighted losses,
  summed token counts, other statistics averaged."""
  out = {k: jnp.mean(v, axis=0) for k, v in ms.items()}
  for key in ('tokens', *(f'tokens/{m}' for m in modalities)):
    out[key] = ms[key].sum(0)
  out['loss'] = (ms['loss'] * ms['tokens']).sum(0) / jnp.maximum(out['tokens'], 1)
  for m in modalities:
    out[f'loss/{m}'] = (ms[f'loss/{m}'] * ms[f'tokens/{m}']).sum(0) / jnp.maximum(
        out[f'tokens/{m}'], 1)
  return out
