"""The post-hoc stage: auxiliary routers trained on a finished run's frozen model.

As in the paper, the model is trained first; then every expert group and MoD layer gets
an auxiliary router (moma_jax/model/aux_router.py), trained alone by binary cross-
entropy against the group-level top-k decisions the frozen model makes on its training
data; then their compute-matched thresholds are calibrated on training batches
(moma_jax/inference/thresholds.py). The stage ends with an evaluation on the
evaluation batches (the validation splits mixed and packed as training's batches,
moma_jax/runs/evaluation.py), every mode on the same batches:
  eval/...          teacher-forced loss (the routing groups decide), as moma-eval;
  eval_causal/...   causal loss (the auxiliary routers decide, token by token, p > 0.5);
  eval_causal_calibrated/...  the same at the compute-matched thresholds;
  aux_router/...    accuracy, balanced accuracy, precision and recall of the routers
                    against the teacher-forced decisions, overall and per router kind;
  flops/..., usage/...  forward FLOPs per token of each mode and the causal routing
                    they come from (`evaluate_modes`).
`moma-aux` (moma_jax/cli/aux.py) runs it; the results go to RUN/aux_router/
(moma_jax/inference/aux_store.py), where `moma_jax.load` finds them.

Every function that reads data takes `put`, which makes this process's rows of a batch
[B, L] the step's input arrays: `evaluation.to_device` on one device, or
`sharding.global_batch` over a mesh (then run under `jax.set_mesh(mesh)` and
`sharding.axis_rules()`, with the parameters placed there: `moma_jax.load(mesh=...)`).

Axis legend: B batch, L length.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax

from moma_jax.analysis import flops
from moma_jax import configs
from moma_jax.data import documents as docs_lib
from moma_jax.data import pipeline
from moma_jax.inference import aux_store
from moma_jax.inference import thresholds
from moma_jax.model import aux_router
from moma_jax.model import names
from moma_jax.model import routing_spec
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import evaluation
from moma_jax.runs import state as train_state


# Mixed validation batches per dataset the routers' rates are counted on when
# `train.eval_max_batches` is None.
VALIDATION_BATCHES_PER_DATASET = 16
# Token positions of the training stream the compute-matched thresholds are calibrated
# on, and of the mixed validation stream causal routing is measured on (2^18: 64 batches
# of 16 x 256; the routers' shares vary from batch to batch, images most).
CALIBRATION_TOKENS = USAGE_TOKENS = 1 << 18

Put = Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]]


def _rows(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers, split: str = 'train'):
  """This process's rows of the run's mixed stream of `split` (batches [B/P, L])."""
  return pipeline.train_iterator(config, tok, jax.process_index(), jax.process_count(),
                                 split=split)


def init_aux_params(model: transformer.Decoder, seed: int,
                    mesh: jax.sharding.Mesh | None = None):
  """Fresh auxiliary-router parameters for `model` (built with aux_routers=True),
  placed on `mesh` by the training rules (None: this process's first device). Only
  the routers' parameters are made (the rest of the init is dead code under jit)."""
  target = aux_store.split(train_state.abstract_params(
      model, sharding.one_device_mesh() if mesh is None else mesh))[1]
  init = jax.jit(lambda rng: aux_store.split(transformer.init(model, rng)[0])[1],
                 out_shardings=jax.tree.map(lambda a: a.sharding, target))
  with sharding.outside_mesh():
    return init(jax.random.key(seed))


def make_aux_train_step(model: transformer.Decoder, tx):
  """(main_params, aux_params, opt_state, batch) -> (aux_params, opt_state, metrics),
  jit'd: one optimizer step on the routers' cross-entropy; the model's parameters
  (an argument, not a compile-time constant) stay fixed."""
  def objective(aux, main, batch):
    _, metrics = transformer.loss_fn(model, aux_store.merge(main, aux), batch)
    return metrics[names.aux_router_metric('loss')], metrics

  @jax.jit
  def step(main, aux, opt, batch):
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(aux, main, batch)
    updates, opt = tx.update(grads, opt, aux)
    keys = [k for k in metrics if names.is_aux_router_metric(k)]
    return optax.apply_updates(aux, updates), opt, {k: metrics[k] for k in keys}
  return step


def train_routers(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                  tok: docs_lib.Tokenizers, *, steps: int, lr: float, log_every: int = 20,
                  on_row: Callable[[int, dict[str, float]], None] | None = None,
                  put: Put = evaluation.to_device):
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
  data = _rows(config, tok)
  for step in range(1, steps + 1):
    aux, opt, metrics = step_fn(main, aux, opt, put(next(data)))
    if on_row is not None and (step % log_every == 0 or step == steps or step == 1):
      on_row(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
  return aux


def router_accuracy(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                    tok: docs_lib.Tokenizers, put: Put = evaluation.to_device
                    ) -> dict[str, float]:
  """`aux_router/...` rates on held-out batches that mix the datasets as training does
  (routing groups of one dataset alone would shift the group-level decisions): the
  validation splits' mixed stream, shuffled as training's, `train.eval_max_batches`
  batches of it (16 per dataset when None). The routers' decisions against the
  teacher-forced ones, counted over all batches before dividing."""
  @jax.jit
  def counts(params, batch):
    _, state = model.apply({'params': params}, batch['tokens'], batch['modality'],
                           batch['segment_ids'], batch['positions'],
                           mutable=[aux_router.COLLECTION])
    return aux_router.totals(state[aux_router.COLLECTION])

  total: dict[str, dict[str, float]] = {}
  count = (config.train.eval_max_batches
           or VALIDATION_BATCHES_PER_DATASET * len(configs.mixture(config.data)))
  batches = _rows(config, tok, split=config.data.eval_split)
  for batch in itertools.islice(batches, count):
    for kind, c in jax.device_get(counts(params, put(batch))).items():
      slot = total.setdefault(kind, dict.fromkeys(aux_router.COUNTS, 0.0))
      for key in aux_router.COUNTS:
        slot[key] += float(c[key])
  return {k: float(v) for k, v in aux_router.rates(
      {kind: {key: np.float64(v) for key, v in c.items()} for kind, c in total.items()}
  ).items()}


def batches_of(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers, tokens: int,
               split: str = 'train', put: Put = evaluation.to_device
               ) -> list[Mapping[str, jax.Array]]:
  """The first batches of the run's mixed stream of `split`, enough to hold `tokens`
  token positions (at least one batch)."""
  per = config.train.batch_size * config.data.seq_len
  data = _rows(config, tok, split=split)
  return [put(next(data)) for _ in range(max(1, -(-tokens // per)))]


def calibrate(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
              tok: docs_lib.Tokenizers, tokens: int = CALIBRATION_TOKENS,
              on_pass: Callable[[int, int], None] | None = None,
              put: Put = evaluation.to_device):
  """`params` with compute-matched thresholds (moma_jax/inference/thresholds.py),
  calibrated on the first `tokens` token positions of the training stream."""
  return thresholds.calibrate(model, params, routing_spec.from_config(config),
                              batches_of(config, tok, tokens, put=put), on_pass=on_pass)


def usage_of(config: ml_collections.ConfigDict, measured: dict[str, Any]) -> flops.Usage:
  """The `flops.Usage` of `thresholds.measure`'s pooled counts: per layer and modality,
  the experts a token goes to (summed over the layer's expert groups; None where no
  auxiliary router decides, as for a dense FFN) and the MoD picked shares."""
  m = config.model
  layers = configs.mod_layers(m)
  experts = {name: [] for name in m.modalities}
  picked = {name: [] for name in ('all', *m.modalities)}
  for i, is_mod in enumerate(layers):
    routers = [names.RouterSite(i, g.name, inside_mod=is_mod)
               for g in routing_spec.from_config(config).groups]
    routers = [r for r in routers if names.share(r) in measured]
    depth = names.RouterSite(i)
    picked['all'].append(measured[names.share(depth)][0] if is_mod else 1.0)
    for name in m.modalities:
      picked[name].append(measured[names.share(depth, name)][0] if is_mod else 1.0)
      if not routers:
        experts[name].append(None)
        continue
      runs = max(measured[names.eligible(r, name)] for r in routers)   # tokens in the block
      took = sum(sum(measured[names.taken(r, name)]) for r in routers)
      experts[name].append(took / max(runs, 1))
  return flops.Usage(experts={k: tuple(v) for k, v in experts.items()},
                     picked={k: tuple(v) for k, v in picked.items()})


def held_out_batches(config: ml_collections.ConfigDict, tok: docs_lib.Tokenizers,
                     put: Put = evaluation.to_device) -> list[Mapping[str, jax.Array]]:
  """`USAGE_TOKENS` of the mixed validation stream: the datasets mixed as in training."""
  return batches_of(config, tok, USAGE_TOKENS, split=config.data.eval_split, put=put)


def causal_modes(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                 tok: docs_lib.Tokenizers, calibrated: bool = True,
                 held_out: list[Mapping[str, jax.Array]] | None = None,
                 put: Put = evaluation.to_device) -> dict[str, Any]:
  """Causal evaluation at threshold 0.5 ('eval_causal/...') and, if `calibrated`, at the
  compute-matched thresholds `params` carry ('eval_causal_calibrated/...'), with the
  'flops/...' and 'usage/...' of each, measured on `held_out` (default
  `held_out_batches`; `evaluate_modes`)."""
  out: dict[str, Any] = {}
  step = evaluation.make_eval_step(model.in_mode(causal=True), config.model.modalities,
                                   evaluation.datasets_of(config))
  modes = [('eval_causal', thresholds.at_half(params))]
  if calibrated:
    modes.append(('eval_causal_calibrated', params))
  if held_out is None:
    held_out = held_out_batches(config, tok, put)
  for mode, p in modes:
    out.update(evaluation.evaluate(step, p, config, tok, put=put, prefix=mode))
    measured = (thresholds.measure(model, p, held_out, config.model.modalities)
                if model.mode.aux_routers else {})
    out.update({f'usage/{mode}/{k}': v for k, v in measured.items()})
    for k, v in flops.measured_forward(config, usage_of(config, measured)).items():
      out[f'flops/{mode}' + ('' if k == 'overall' else f'/{k}')] = v
  return out


def evaluate_modes(model: transformer.Decoder, params, config: ml_collections.ConfigDict,
                   tok: docs_lib.Tokenizers, put: Put = evaluation.to_device
                   ) -> dict[str, Any]:
  """Teacher-forced and causal evaluation, and the routers' accuracy (module docstring).

  `params` carry the routers' calibrated thresholds. Causal mode is evaluated at both
  thresholds: 'eval_causal/...' at 0.5 and 'eval_causal_calibrated/...' compute-matched;
  'gap[/{modality}]' and 'gap_calibrated[/{modality}]' are causal minus teacher-forced
  loss. 'flops/{mode}[/{modality}]' are forward FLOPs per token: analytic for 'eval',
  measured on `USAGE_TOKENS` of mixed validation batches for the causal modes
  (auxiliary routers included; 'flops/{mode}/aux_routers[/{modality}]' their part), and
  'usage/{mode}/...' those measurements (`thresholds.measure`: each router's shares,
  pooled over the tokens). Every loss comes from the evaluation batches, whose routing
  groups mix the datasets as training's do, so teacher-forced and causal losses are
  measured on the same tokens in the same groups.
  """
  mods = config.model.modalities
  teacher_step = evaluation.make_eval_step(model, mods, evaluation.datasets_of(config))
  out: dict[str, Any] = evaluation.evaluate(teacher_step, params, config, tok, put=put)
  out.update(router_accuracy(model, params, config, tok, put))
  report = flops.count(config)
  out.update({f'flops/eval{"" if k == "overall" else "/" + k}': v
              for k, v in report.forward.items()})
  held_out = held_out_batches(config, tok, put)
  out.update(causal_modes(model, params, config, tok, held_out=held_out, put=put))
  for suffix in ('', *(f'/{m}' for m in mods)):
    for mode, gap in (('eval_causal', 'gap'), ('eval_causal_calibrated', 'gap_calibrated')):
      causal, teacher = f'{mode}/loss{suffix}', f'eval/loss{suffix}'
      if causal in out and teacher in out:
        out[f'{gap}{suffix}'] = out[causal] - out[teacher]
  return out

