"""The early-fusion decoder: one token stream, one vocabulary, every modality.

Axis legend: B batch, L length, D embed, V vocabulary.

`Decoder` maps a batch (tokens, modality, segment_ids, positions, loss_mask,
all [B, L]) to float32 logits [B, L, V]. `loss_fn` adds the per-modality next-token
loss, the z-loss, routing auxiliary losses and the routing statistics.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moma_jax import configs
from moma_jax.model import aux_router
from moma_jax.model.block import Block
from moma_jax.model.depth import DepthRoutedBlock
from moma_jax.model.layers import Projection, RMSNorm, constrain
from moma_jax.model import loss as loss_lib
from moma_jax.model import remat
from moma_jax.model import route_stats
from moma_jax.model import routing_spec
from moma_jax.model import names
from moma_jax.model.run_mode import DecoderPart, RunMode

class Decoder(DecoderPart):
  """tokens, modality, segment_ids, positions [B, L] -> logits [B, L, V] float32.

  config, spec, mode: `DecoderPart` (moma_jax/model/run_mode.py); every layer receives
  the same three. `in_mode(causal=True)` is this decoder routing causally.
  """

  def in_mode(self, **changes) -> 'Decoder':
    """This decoder, unbound, with `changes` to its `RunMode` (aux_routers, causal,
    decode); the parameters it takes are the same."""
    return self.clone(parent=None, mode=dataclasses.replace(self.mode, **changes))

  @nn.compact
  def __call__(self, tokens, modality, segment_ids, positions, deterministic: bool = True):
    m = self.config
    dtype, param_dtype = self.dtype, self.param_dtype
    embed = nn.Embed(m.vocab_size, m.d_model, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(1.0), ('vocab', 'embed')),
                     name='embed')
    x = constrain(embed(tokens), ('batch', 'length', 'embed'))
    for i, is_mod in enumerate(configs.mod_layers(m)):
      cls = DepthRoutedBlock if is_mod else Block
      if m.remat != 'none':
        cls = nn.remat(cls, static_argnums=(5,), policy=remat.policy(m.remat))
      x = cls(self.config, self.spec, self.mode, rows_per_group=self.spec.group_size,
              name=names.layer(i))(
                  x, modality, segment_ids, positions, deterministic)
    x = RMSNorm(dtype=dtype, param_dtype=param_dtype, name='final_norm')(x)
    # Untied output head (Chameleon); logits in float32 for the loss and z-loss.
    logits = Projection((m.vocab_size,), ('embed', 'vocab'), dtype=dtype,
                        param_dtype=param_dtype, name=names.OUTPUT)(x)
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


def build(config: ml_collections.ConfigDict, aux_routers: bool | None = None) -> Decoder:
  """The decoder of a validated config. aux_routers None: as the training run has them
  (`model.aux_router.enabled` with mode 'joint'; post-hoc routers come later)."""
  configs.validate(config)
  if aux_routers is None:
    aux_routers = configs.has_joint_aux_routers(config.model)
  return Decoder(ml_collections.FrozenConfigDict(config.model), routing_spec.from_config(config),
                 RunMode(aux_routers=aux_routers))


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int | None = None):
  """An all-text batch of the run's shapes (for init and shape inference)."""
  return _all_text(batch_size or config.routing.group_size, config.data.seq_len)


def _all_text(b: int, l: int):
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  ones = jnp.ones((b, l), jnp.int32)
  return dict(tokens=jnp.zeros((b, l), jnp.int32), modality=jnp.zeros((b, l), jnp.int8),
              segment_ids=ones, positions=pos, loss_mask=ones)


def init_boxed(model: Decoder, rng: jax.Array, batch: Mapping[str, jax.Array] | None = None):
  """The parameters in flax's boxes, which carry each one's logical axis names."""
  # Parameter shapes do not depend on the length: one routing group of max_len rows.
  batch = batch or _all_text(model.spec.group_size, model.config.max_len)
  return _init_params(model, rng, {k: batch[k] for k in _MODEL_INPUTS})


_MODEL_INPUTS = ('tokens', 'modality', 'segment_ids', 'positions')


# One compiled program per model (modules compare by their fields): run eagerly, flax's
# init would compile every op of the model on its own, hundreds of small programs.
@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: Decoder, rng: jax.Array, inputs: Mapping[str, jax.Array]):
  return model.init(rng, *(inputs[k] for k in _MODEL_INPUTS))['params']


def init(model: Decoder, rng: jax.Array, batch: Mapping[str, jax.Array] | None = None):
  """Returns (params, logical axis names of every parameter, as a matching pytree)."""
  boxed = init_boxed(model, rng, batch)
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def apply(model: Decoder, params, batch: Mapping[str, jax.Array],
          rng: jax.Array | None = None, mutable: Sequence[str] = ()):
  """(logits [B, L, V] float32, the collections named in `mutable`) of one batch;
  `rng` for training (router noise), None for evaluation (deterministic)."""
  rngs = {'router': rng} if rng is not None else {}
  out = model.apply({'params': params}, batch['tokens'], batch['modality'],
                    batch['segment_ids'], batch['positions'], deterministic=rng is None,
                    rngs=rngs, mutable=list(mutable) or False)
  return out if mutable else (out, {})


def loss_fn(model: Decoder, params, batch: Mapping[str, jax.Array],
            rng: jax.Array | None = None,
            z_loss: float = 0.0) -> tuple[jax.Array, dict[str, Any]]:
  """Returns (objective, metrics) for one batch.

  objective = cross-entropy + z_loss * logsumexp^2 + load_balance_weight * balance
  losses (token choice) + the auxiliary routers' binary cross-entropy (their inputs
  are stop-gradient, so it trains them alone). z_loss is the trainer's weight
  (`train.z_loss`, passed by the training step); evaluation reads the metrics alone.
  metrics: 'loss', 'loss/{modality}', 'tokens/...', 'z_loss', 'balance_loss',
  `route/...` statistics and `aux_router/...` accuracies. Pass `rng` for training (router noise).
  """
  m = model.config
  logits, state = apply(model, params, batch, rng,
                        (names.ROUTE_STATS, names.BALANCE_LOSS, names.AUX_ROUTER_SCORES))
  with jax.named_scope(names.LOSS):
    objective, metrics = loss_lib.next_token_loss(
        logits, batch, m.modalities, z_loss)
  balance = jax.tree.leaves(state.get(names.BALANCE_LOSS, {}))
  balance = sum(balance) / len(balance) if balance else jnp.float32(0)
  metrics[names.BALANCE_LOSS] = balance
  metrics.update(route_stats.summarize(state.get(names.ROUTE_STATS, {})))
  metrics.update(aux_router.summarize(state.get(names.AUX_ROUTER_SCORES, {})))
  objective = objective + m.load_balance_weight * balance
  if names.aux_router_metric('loss') in metrics:
    objective = objective + metrics[names.aux_router_metric('loss')]
  return objective, metrics
