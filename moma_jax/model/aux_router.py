"""Auxiliary routers: causal predictors of the group-level top-k routing decisions.

Expert choice and mixture-of-depths pick tokens by comparing each token with the whole
routing group, future tokens included, so a model trained that way cannot decode one
token at a time. An auxiliary router looks at one token only and predicts, by binary
cross-entropy, whether the group-level decision took it:
    p = sigmoid(SiLU(x W1) W2),   W1: D x D/2,   W2: D/2 x E
(E = the experts of one expert group, or 1 for a mixture-of-depths layer). Its input is
the main router's input under stop-gradient, so training it never changes the model.
In causal mode a token goes to an expert (through a MoD layer) when its logit exceeds
the router's threshold t, a logit: the main router still gives the weight. t = 0 is the
paper's rule, p > 0.5; a compute-matched t (moma_jax/inference/thresholds.py) makes each
expert take, on average, the share of tokens it takes in training. The thresholds are
the parameter `threshold` [R, E] of the router (R = 1, or one row per modality for a
modality-aware MoD layer): stored with its weights, never trained (no gradient reaches
them), 0 until calibrated.

Axis legend: G routing groups, N tokens per group, D embed, E outputs, K candidate slots,
R threshold rows.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax.model import names
from moma_jax.model.layers import default_kernel_init

COLLECTION = names.AUX_ROUTER_SCORES
# What causal mode records of each router's decisions, to calibrate and measure them.
DECISIONS = names.AUX_DECISIONS
THRESHOLD = 'threshold'
# Counts each router sows (summed over its eligible tokens and outputs).
COUNTS = ('bce_sum', 'count', 'tp', 'fp', 'fn', 'tn')


class AuxRouter(nn.Module):
  """x [..., D], row [...] int (the threshold row of each token; None: row 0) ->
  (logits [..., E] float32, margins [..., E] = logits - threshold; decision: margin > 0)."""
  outputs: int
  param_dtype: jnp.dtype = jnp.float32
  threshold_rows: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, row: jax.Array | None = None):
    d = x.shape[-1]
    w1 = self.param('w1', nn.with_logical_partitioning(default_kernel_init, ('embed', None)),
                    (d, d // 2), self.param_dtype)
    w2 = self.param('w2', nn.with_logical_partitioning(default_kernel_init, (None, None)),
                    (d // 2, self.outputs), self.param_dtype)
    threshold = self.param(THRESHOLD, nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None)), (self.threshold_rows, self.outputs),
        jnp.float32)
    h = nn.silu(jax.lax.stop_gradient(x).astype(jnp.float32) @ w1.astype(jnp.float32))
    logits = h @ w2.astype(jnp.float32)
    t = jax.lax.stop_gradient(threshold)
    t = t[0] if row is None else t[row]
    return logits, logits - t

  def record(self, logits: jax.Array, margins: jax.Array, eligible: jax.Array,
             modality: jax.Array) -> None:
    """Sows what causal mode decided, to calibrate and measure it (`DECISIONS`/...):
    logits and margins [..., E], eligible [..., R] bool (the tokens each threshold row
    decides over) and the tokens' modality [...]."""
    for key, value in (('logits', logits), ('margins', margins), ('eligible', eligible),
                       ('modality', modality)):
      self.sow(DECISIONS, key, value)

  def score(self, logits: jax.Array, target: jax.Array, eligible: jax.Array,
            name: str) -> None:
    """Sows this router's loss and confusion counts against the group-level decisions.

    logits, target [..., E] (target bool: the token was taken), eligible [..., E|1]
    bool (tokens the decision was made over). Sown under `COLLECTION`/{name}/...; summed
    over layers by `summarize`.
    """
    mask = jnp.broadcast_to(eligible, logits.shape)
    # Binary cross-entropy on the logits, written with log-sigmoids so that it stays
    # finite for logits of any size.
    t = target.astype(jnp.float32)
    bce = -(t * jax.nn.log_sigmoid(logits) + (1 - t) * jax.nn.log_sigmoid(-logits))
    pred = logits > 0
    sums = {
        'bce_sum': jnp.where(mask, bce, 0).sum(),
        'count': mask.sum().astype(jnp.float32),
        'tp': (mask & pred & target).sum().astype(jnp.float32),
        'fp': (mask & pred & ~target).sum().astype(jnp.float32),
        'fn': (mask & ~pred & target).sum().astype(jnp.float32),
        'tn': (mask & ~pred & ~target).sum().astype(jnp.float32),
    }
    for key, value in sums.items():
      self.sow(COLLECTION, f'{name}/{key}', value)


def taken_mask(idx: jax.Array, wanted: jax.Array, n: int) -> jax.Array:
  """Which tokens each expert took: idx [G, E, K] candidates, wanted [G, E] -> [G, N, E]
  bool (candidate k of expert e taken iff k < wanted[g, e])."""
  g, e, k = idx.shape
  took = jnp.arange(k) < wanted[..., None]                                # [G, E, K]
  target = jnp.where(took, idx, n)                                        # N: nowhere
  mask = jnp.zeros((g, e, n + 1), bool)
  gi, ei = jnp.arange(g)[:, None, None], jnp.arange(e)[None, :, None]
  return jnp.swapaxes(mask.at[gi, ei, target].set(True)[..., :n], 1, 2)


def totals(sown) -> dict[str, dict[str, jax.Array]]:
  """{router kind ('text', 'image', 'all', 'depth'): {count: sum over layers}} from the
  sown values."""
  kinds: dict[str, dict[str, jax.Array]] = {}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(sown or {}))
  for path, value in ((p, v) for p, values in flat.items() for v in values):
    kind, key = path[-1].rsplit('/', 1)         # sown as '{kind}/{count}'
    slot = kinds.setdefault(kind, dict.fromkeys(COUNTS, jnp.float32(0)))
    slot[key] = slot[key] + value
  return kinds


def rates(kinds: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """'aux_router/{loss, accuracy, balanced_accuracy, precision, recall}' over all
  routers (micro-averaged) and '.../{kind}' per kind, from `totals` (arrays or floats)."""
  if not kinds:
    return {}
  out = _rates({k: sum(c[k] for c in kinds.values()) for k in COUNTS}, None)
  for kind, c in sorted(kinds.items()):
    out.update(_rates(c, kind))
  return out


def summarize(sown) -> dict[str, jax.Array]:
  """The `rates` of one forward pass's sown counts."""
  return rates(totals(sown))


def _rates(c: dict[str, Any], kind: str | None) -> dict[str, Any]:
  safe = lambda a, b: a / jnp.maximum(b, 1)
  positives, negatives = c['tp'] + c['fn'], c['tn'] + c['fp']
  recall = safe(c['tp'], positives)
  specificity = safe(c['tn'], negatives)
  # The mean of the rates of the classes present: with no negatives (1t1i takes every
  # token) it is the recall, not half of it.
  balanced = jnp.where(negatives == 0, recall,
                       jnp.where(positives == 0, specificity, (recall + specificity) / 2))
  values = {'loss': safe(c['bce_sum'], c['count']),
            'accuracy': safe(c['tp'] + c['tn'], c['count']),
            'balanced_accuracy': balanced,
            'precision': safe(c['tp'], c['tp'] + c['fp']),
            'recall': recall}
  return {names.aux_router_metric(stat, kind): v for stat, v in values.items()}
