"""Teacher-forced evaluation on the validation split of every dataset of the mixture.

`evaluate` returns token-weighted mean losses:
  eval/loss, eval/loss/{modality}                       over all datasets together;
  eval/{dataset}/loss, eval/{dataset}/loss/{modality}   per dataset.
A dataset without tokens of a modality has no key for it. A model in causal mode
(auxiliary routers decide, token by token) is evaluated the same way, under the prefix
'eval_causal'. `mean_losses` pools the same means over any list of batches.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma_jax import configs
from moma_jax.data import documents as docs_lib
from moma_jax.data import pipeline
from moma_jax.model import transformer

EvalStep = Callable[[object, Mapping[str, jax.Array]], Mapping[str, jax.Array]]


def make_eval_step(model: transformer.Decoder, modalities,
                   shardings: tuple[Any, Any] | None = None) -> EvalStep:
  """(params, batch of [B, L] arrays) -> {'loss', 'loss/{m}', 'tokens', 'tokens/{m}'},
  jit'd; no router noise. shardings: (params', batch's) under a mesh."""
  keys = ('loss', 'tokens', *(f'{k}/{m}' for m in modalities for k in ('loss', 'tokens')))

  def step_fn(params, batch):
    _, metrics = transformer.loss_fn(model, params, batch)
    return {k: metrics[k] for k in keys}
  if shardings is None:
    return jax.jit(step_fn)
  replicated = jax.sharding.NamedSharding(shardings[1].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=shardings, out_shardings=replicated)


def to_device(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host rows -> device arrays (one device; a mesh places them with the sharding)."""
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _pooled(eval_step: EvalStep, params, batches: Iterable[Any], keys: Sequence[str]):
  """(sums, counts): each key's loss times its token count, and the counts, summed over
  `batches` ('loss/text' counts 'tokens/text')."""
  sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0)
  for batch in batches:
    m = jax.device_get(eval_step(params, batch))
    for key in keys:
      n = int(m['tokens' + key[len('loss'):]])
      sums[key] += float(m[key]) * n
      counts[key] += n
  return sums, counts


def _keys(modalities) -> tuple[str, ...]:
  return ('loss', *(f'loss/{m}' for m in modalities))


def mean_losses(eval_step: EvalStep, params, batches: Iterable[Mapping[str, jax.Array]],
                modalities, prefix: str) -> dict[str, float]:
  """'{prefix}/loss[/{modality}]': token-weighted mean losses over `batches` (device
  arrays), pooled over all of them before dividing."""
  sums, counts = _pooled(eval_step, params, batches, _keys(modalities))
  return {f'{prefix}/{k}': sums[k] / counts[k] for k in sums if counts[k]}


def evaluate(eval_step: EvalStep, params, config: ml_collections.ConfigDict,
             tok: docs_lib.Tokenizers,
             put: Callable[[Mapping[str, np.ndarray]], Any] = to_device,
             prefix: str = 'eval') -> dict[str, float]:
  """Reads at most `train.eval_max_batches` batches of each dataset's eval split (this
  process's rows of each; `put` makes them the step's input arrays). Keys start with
  `prefix` ('eval', or 'eval_causal' for a causal-mode model)."""
  keys = _keys(config.model.modalities)
  total, count, out = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0), {}
  for name, _ in configs.mixture(config.data):
    batches = pipeline.eval_batches(config, tok, name, jax.process_index(),
                                    jax.process_count())
    batches = map(put, itertools.islice(batches, config.train.eval_max_batches))
    sums, counts = _pooled(eval_step, params, batches, keys)
    for key in keys:
      if counts[key]:
        out[f'{prefix}/{name}/{key}'] = sums[key] / counts[key]
      total[key] += sums[key]
      count[key] += counts[key]
  out.update({f'{prefix}/{k}': total[k] / count[k] for k in keys if count[k]})
  return out
