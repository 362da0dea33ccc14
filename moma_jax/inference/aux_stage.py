"""The post-hoc stage: auxiliary routers trained on a finished run's frozen model.

As in the paper, the model is trained first; then every expert group and MoD layer gets
an auxiliary router (moma_jax/model/aux_router.py), trained alone by binary cross-
entropy against the group-level top-k decisions the frozen model makes on its training
data. The stage ends with an evaluation on the validation splits:
  eval/...          teacher-forced loss (the routing groups decide), as moma-eval;
  eval_causal/...   causal loss (the auxiliary routers decide, token by token);
  aux_router/...    accuracy, balanced accuracy, precision and recall of the routers
                    against the teacher-forced decisions, overall and per router kind.
`moma-aux` (moma_jax/cli/aux.py) runs it; the results go to RUN/aux_router/
(moma_jax/inference/aux_store.py), where `moma_jax.load` finds them.

Axis legend: B batch, L length.
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import numpy as np
import optax

from moma_jax.data import documents as docs_lib
from moma_jax.data import pipeline
from moma_jax.inference import aux_store
from moma_jax.model import aux_router
from moma_jax.model import transformer
from moma_jax.training import evaluation


# Mixed validation batches per dataset when `train.eval_max_batches` is None.
VALIDATION_BATCHES_PER_DATASET = 16


def init_aux_params(model: transformer.Decoder, seed: int):
  """Fresh auxiliary-router parameters for `model` (built with aux_routers=True)."""
  params, _ = transformer.init(model, jax.random.key(seed))
  return aux_store.split(params)[1]


def make_aux_train_step(model: transformer.Decoder, tx):
  """(main_params, aux_params, opt_state, batch) -> (aux_params, opt_state, metrics),
  jit'd: one optimizer step on the routers' cross-entropy; the model's parameters
  (an argument, not a compile-time constant) stay fixed."""
  def objective(aux, main, batch):
    _, metrics = transformer.loss_fn(model, aux_store.merge(main, aux), batch)
    return metrics['aux_router/loss'], metrics

  @jax.jit
  def step(main, aux, opt, batch):
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(aux, main, batch)
    updates, opt = tx.update(grads, opt, aux)
    keys = [k for k in metrics if k.startswith('aux_router/')]
    return optax.apply_updates(aux, updates), opt, {k: metrics[k] for k in keys}
  return step


def train_routers(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                  tok: docs_lib.Tokenizers, *, steps: int, lr: float, log_every: int = 20,
                  on_row: Callable[[int, dict[str, float]], None] | None = None):
  """Trains the auxiliary routers of `params` (model and routers, merged) for `steps`
  batches of the run's training stream; returns the routers' parameters.

  AdamW with lr warm-up over the first 10% of steps and cosine decay; `on_row(step,
  metrics)` receives the `aux_router/...` metrics every `log_every` steps and at the end.
  """
  main, aux = aux_store.split(params)
  warmup = max(1, steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                end_value=lr / 100)
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt = tx.init(aux)
  step_fn = make_aux_train_step(model, tx)
  data = pipeline.train_iterator(config, tok)
  for step in range(1, steps + 1):
    aux, opt, metrics = step_fn(main, aux, opt, evaluation.to_device(next(data)))
    if on_row is not None and (step % log_every == 0 or step == steps or step == 1):
      on_row(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
  return aux


def router_accuracy(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                    tok: docs_lib.Tokenizers) -> dict[str, float]:
  """`aux_router/...` rates on the validation splits: the routers' decisions against the
  teacher-forced ones, counted over all batches before dividing. The batches mix the
  datasets as training does (routing groups of one dataset alone would shift the
  group-level decisions): `train.eval_max_batches` per dataset of the mixture (all
  of them once when None)."""
  @jax.jit
  def counts(params, batch):
    _, state = model.apply({'params': params}, batch['tokens'], batch['modality'],
                           batch['segment_ids'], batch['positions'],
                           mutable=[aux_router.COLLECTION])
    return aux_router.totals(state[aux_router.COLLECTION])

  total: dict[str, dict[str, float]] = {}
  names = pipeline.mixture(config)
  per = config.train.eval_max_batches or VALIDATION_BATCHES_PER_DATASET
  batches = pipeline.train_iterator(config, tok, split=config.data.eval_split)
  for _ in range(per * len(names)):
    for kind, c in jax.device_get(counts(params, evaluation.to_device(next(batches)))).items():
      slot = total.setdefault(kind, dict.fromkeys(aux_router.COUNTS, 0.0))
      for key in aux_router.COUNTS:
        slot[key] += float(c[key])
  return {k: float(v) for k, v in aux_router.rates(
      {kind: {key: np.float64(v) for key, v in c.items()} for kind, c in total.items()}
  ).items()}


def evaluate_modes(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                   tok: docs_lib.Tokenizers) -> dict[str, float]:
  """Teacher-forced and causal evaluation, and the routers' accuracy (module docstring);
  also 'gap/{modality}' and 'gap' = causal minus teacher-forced loss."""
  mods = config.model.modalities
  out = evaluation.evaluate(evaluation.make_eval_step(model, mods), params, config, tok)
  out.update(evaluation.evaluate(evaluation.make_eval_step(model.clone(causal=True), mods),
                                 params, config, tok, prefix='eval_causal'))
  out.update(router_accuracy(model, params, config, tok))
  for suffix in ('', *(f'/{m}' for m in mods)):
    if f'eval/loss{suffix}' in out and f'eval_causal/loss{suffix}' in out:
      out[f'gap{suffix}'] = out[f'eval_causal/loss{suffix}'] - out[f'eval/loss{suffix}']
  return out

