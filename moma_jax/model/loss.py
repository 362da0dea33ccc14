"""Next-token cross-entropy booked per target modality, and the z-loss.

Axis legend: B batch, L length, V vocabulary.
Batch convention: `loss_mask[b, t] = 1` when token t is a prediction target; the
prediction comes from position t-1 of the same segment. A target's loss is booked to
the target's modality.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from moma_jax.model import names


def token_losses(logits: jax.Array, batch: Mapping[str, jax.Array]):
  """Per target position: (cross-entropy, logsumexp, is a target), each [B, L-1].

  logits [B, L, V] (any float dtype; the math is float32); batch holds tokens,
  segment_ids, loss_mask [B, L]. Position t predicts token t+1 of the same segment.
  """
  lg = logits[:, :-1].astype(jnp.float32)
  targets = batch['tokens'][:, 1:]
  seg = batch['segment_ids']
  mask = (batch['loss_mask'][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  lse = jax.nn.logsumexp(lg, axis=-1)
  ce = lse - jnp.take_along_axis(lg, targets[..., None], axis=-1)[..., 0]
  return ce, lse, mask


def book(ce: jax.Array, mask: jax.Array, target_modality: jax.Array,
         modalities: Sequence[str]) -> dict[str, jax.Array]:
  """'loss' and 'tokens' of the targets in `mask`, and per modality 'loss/{m}',
  'tokens/{m}' (all [B, L-1]; target_modality the targets' modality ids)."""
  count = mask.sum()
  out = {names.LOSS_METRIC: jnp.where(mask, ce, 0.0).sum() / jnp.maximum(count, 1),
         names.TOKENS: count}
  for i, name in enumerate(modalities):
    m = mask & (target_modality == i)
    out[names.per_modality(names.LOSS_METRIC, name)] = (
        jnp.where(m, ce, 0.0).sum() / jnp.maximum(m.sum(), 1))
    out[names.per_modality(names.TOKENS, name)] = m.sum()
  return out


def next_token_loss(logits: jax.Array, batch: Mapping[str, jax.Array],
                    modalities: Sequence[str], z_loss: float):
  """Returns (objective, metrics).

  logits [B, L, V] (any float dtype; the math is float32); batch holds tokens,
  modality, segment_ids, loss_mask [B, L]. objective = mean over targets of
  cross-entropy + z_loss * logsumexp^2. metrics: 'loss' (cross-entropy alone),
  'loss/{modality}', 'tokens/{modality}' (target counts), 'z_loss'.
  """
  ce, lse, mask = token_losses(logits, batch)
  booked = book(ce, mask, batch['modality'][:, 1:], modalities)
  zl = jnp.where(mask, lse ** 2, 0.0).sum() / jnp.maximum(booked[names.TOKENS], 1)
  metrics = {names.LOSS_METRIC: booked.pop(names.LOSS_METRIC), names.Z_LOSS: zl, **booked}
  return metrics[names.LOSS_METRIC] + z_loss * zl, metrics
