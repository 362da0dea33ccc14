"""What every part of the decoder receives once: its config, its routing sizes, its mode.

`RunMode` says how the decoder runs (a frozen record, so a mode is one value and not
flags threaded through levels); `DecoderPart` declares the fields that the decoder, its
blocks and its routed FFNs share, and the dtypes the config names.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from moma_jax.model.routing_spec import RoutingSpec


@dataclasses.dataclass(frozen=True)
class RunMode:
  """How the decoder runs.

  aux_routers: every expert group and MoD layer carries an auxiliary router
  (moma_jax/model/aux_router.py). causal: routing by those routers, token by token, so
  no logit depends on a later token (teacher-forced routing otherwise looks at the whole
  routing group). decode: attention through a KV cache (the 'cache' collection); each
  call continues the sequences of the calls before it (causal mode only).
  """
  aux_routers: bool = False
  causal: bool = False
  decode: bool = False

  def __post_init__(self):
    if self.decode and not self.causal:
      raise ValueError('decoding with a KV cache needs causal mode')


class DecoderPart(nn.Module):
  """The fields every part of the decoder shares.

  config: the model's config block (`config.model`); spec: its routing sizes
  (moma_jax/model/routing_spec.py); mode: how it runs (`RunMode`).
  """
  config: ml_collections.FrozenConfigDict
  spec: RoutingSpec
  mode: RunMode = RunMode()

  @property
  def dtype(self) -> jnp.dtype:
    """What activations compute in (`model.dtype`)."""
    return jnp.dtype(self.config.dtype)

  @property
  def param_dtype(self) -> jnp.dtype:
    """What parameters are stored in (`model.param_dtype`)."""
    return jnp.dtype(self.config.param_dtype)
