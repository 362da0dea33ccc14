"""Teacher-forced evaluation, routed as training routes.

`evaluate` reads the evaluation batches (`pipeline.mixed_eval_batches`: every dataset's
validation split mixed by the mixture's weights and packed as training's rows, so each
routing group holds what a training group holds) and returns token-weighted mean losses:
  eval/loss, eval/loss/{modality}                       the training mixture's;
  eval/{dataset}/loss, eval/{dataset}/loss/{modality}   each dataset's tokens, from the
                                                        same forward passes.
A dataset without tokens of a modality has no key for it. A model in causal mode
(auxiliary routers decide, token by token) is evaluated on the same batches, under the
prefix 'eval_causal'. `evaluate_per_split` is the diagnostic that reads each split on its
own ('eval_split/{dataset}/...'): there a routing group holds one dataset, as no
training group does, so expert choice routes it differently. `mean_losses` pools the
same means over any list of batches.
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
from moma_jax.model import loss as loss_lib
from moma_jax.model import transformer

EvalStep = Callable[[object, Mapping[str, jax.Array]], Mapping[str, jax.Array]]
SPLIT_PREFIX = 'eval_split'


def _pairs(modalities, dataset: str = '') -> dict[str, str]:
  """{loss key: the key of its token count}, under 'dataset/' when one is named."""
  at = f'{dataset}/' if dataset else ''
  return {f'{at}loss': f'{at}tokens',
          **{f'{at}loss/{m}': f'{at}tokens/{m}' for m in modalities}}


def make_eval_step(model: transformer.Decoder, modalities, datasets: Sequence[str] = (),
                   shardings: tuple[Any, Any] | None = None) -> EvalStep:
  """(params, batch of [B, L] arrays) -> {'loss', 'loss/{m}', 'tokens', 'tokens/{m}'}
  of the batch and, for each name d of `datasets`, the same keys under 'd/' for the
  tokens whose `batch['dataset']` is d's index (one forward pass for all). jit'd; no
  router noise. shardings: (params', batch's) under a mesh."""
  def step_fn(params, batch):
    logits, _ = transformer.apply(model, params, batch)
    # Cross-entropy once per position; each dataset books its own targets of it.
    ce, _, targets = loss_lib.token_losses(logits, batch)
    target_mod = batch['modality'][:, 1:]
    out = loss_lib.book(ce, targets, target_mod, modalities)
    for k, name in enumerate(datasets):
      mine = targets & (batch[pipeline.DATASET][:, 1:] == k)
      out.update({f'{name}/{key}': v
                  for key, v in loss_lib.book(ce, mine, target_mod, modalities).items()})
    return out
  if shardings is None:
    return jax.jit(step_fn)
  replicated = jax.sharding.NamedSharding(shardings[1].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=shardings, out_shardings=replicated)


def to_device(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host rows -> device arrays (one device; a mesh places them with the sharding)."""
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _pooled(eval_step: EvalStep, params, batches: Iterable[Any], pairs: Mapping[str, str]):
  """(sums, counts): each loss key's loss times its token count (`pairs` names the
  count's key), and the counts, summed over `batches`."""
  sums, counts = dict.fromkeys(pairs, 0.0), dict.fromkeys(pairs, 0)
  for batch in batches:
    m = jax.device_get(eval_step(params, batch))
    for key, count_key in pairs.items():
      n = int(m[count_key])
      sums[key] += float(m[key]) * n
      counts[key] += n
  return sums, counts


def _means(sums, counts, prefix: str) -> dict[str, float]:
  return {f'{prefix}/{k}': sums[k] / counts[k] for k in sums if counts[k]}


def mean_losses(eval_step: EvalStep, params, batches: Iterable[Mapping[str, jax.Array]],
                modalities, prefix: str) -> dict[str, float]:
  """'{prefix}/loss[/{modality}]': token-weighted mean losses over `batches` (device
  arrays), pooled over all of them before dividing."""
  return _means(*_pooled(eval_step, params, batches, _pairs(modalities)), prefix)


def datasets_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The mixture's dataset names, in the order of `batch['dataset']`'s indices."""
  return tuple(name for name, _ in configs.mixture(config.data))


def evaluate(eval_step: EvalStep, params, config: ml_collections.ConfigDict,
             tok: docs_lib.Tokenizers,
             put: Callable[[Mapping[str, np.ndarray]], Any] = to_device,
             prefix: str = 'eval') -> dict[str, float]:
  """Reads at most `train.eval_max_batches` evaluation batches (this process's rows of
  each; `put` makes them the step's input arrays) with `eval_step` made for
  `datasets_of(config)`. Keys start with `prefix` ('eval', or 'eval_causal' for a
  causal-mode model)."""
  mods = config.model.modalities
  pairs = _pairs(mods)
  for name in datasets_of(config):
    pairs.update(_pairs(mods, name))
  batches = pipeline.mixed_eval_batches(config, tok, jax.process_index(),
                                        jax.process_count())
  batches = map(put, itertools.islice(batches, config.train.eval_max_batches))
  return _means(*_pooled(eval_step, params, batches, pairs), prefix)


def evaluate_per_split(eval_step: EvalStep, params, config: ml_collections.ConfigDict,
                       tok: docs_lib.Tokenizers,
                       put: Callable[[Mapping[str, np.ndarray]], Any] = to_device,
                       prefix: str = SPLIT_PREFIX) -> dict[str, float]:
  """The diagnostic: each dataset's split read on its own, at most
  `train.eval_max_batches` batches of it, with `eval_step` made without datasets.
  Keys '{prefix}/{dataset}/loss[/{modality}]'."""
  pairs = _pairs(config.model.modalities)
  out = {}
  for name in datasets_of(config):
    batches = pipeline.eval_batches(config, tok, name, jax.process_index(),
                                    jax.process_count())
    batches = map(put, itertools.islice(batches, config.train.eval_max_batches))
    out.update(_means(*_pooled(eval_step, params, batches, pairs), f'{prefix}/{name}'))
  return out
