"""Compute-matched causal thresholds for the auxiliary routers.

Causal mode sends a token to an expert (through a MoD layer) when its auxiliary
router's logit exceeds the router's threshold (moma_jax/model/aux_router.py). The paper's
threshold is p > 0.5 (logit 0, 'half' here): it has no capacity, so causal inference
may spend more or fewer FLOPs per token than training did, and a causal-vs-teacher-forced
loss gap then mixes causality with compute. The 'calibrated' thresholds match the
compute: on calibration batches of the training stream, each expert takes on average the
share of its group's eligible tokens it takes in training (its capacity c; a MoD layer
c_d of the valid tokens, or of each modality's with `mod.modality_aware`). A router's
threshold is the (1 - c) quantile of its logits over those tokens (c >= 1: -inf, every
token).

A router's inputs in causal mode depend on every decision before it, so the routers are
calibrated in stages, in the order the forward pass meets them (a layer's MoD router,
then the expert routers inside its block, then the next layer): pass s sets stage s
from the logits its routers see under the thresholds already set, so after one pass per
stage every threshold is exact on the calibration batches. Each pass also sets the later
stages, as a first guess their own pass then refines.

`calibrate` returns the parameters with the calibrated thresholds; `at_half` the same
parameters at threshold 0. The thresholds are parameters of the routers, so they are
saved with them (moma_jax/inference/aux_store.py).

Axis legend: B batch, L length, E outputs of a router, R threshold rows.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import jax
from jax.experimental import multihost_utils
import numpy as np

from moma_jax.model import aux_router
from moma_jax.model import names
from moma_jax.model import param_names
from moma_jax.model import routing_spec
from moma_jax.model import transformer

HALF, CALIBRATED = 'half', 'calibrated'
CHOICES = (HALF, CALIBRATED)

Path = tuple[str, ...]


def router_paths(params) -> list[Path]:
  """Module paths of every auxiliary router with a threshold, in forward order."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  paths = [k[:-1] for k in flat if k[-1] == aux_router.THRESHOLD]
  return sorted(paths, key=_stage_key)


def _stage_key(path: Path) -> tuple[int, int]:
  """(layer, nesting): a MoD layer's router comes before the routers inside its block."""
  return names.RouterSite.of(path).order


def capacity(spec: routing_spec.RoutingSpec, path: Path) -> float:
  """The share of its eligible tokens the router at `path` takes in training."""
  name = path[-1]
  if name == param_names.aux_router():
    return float(spec.mod_capacity)
  for group in spec.groups:
    if name == param_names.aux_router(group.name):
      return float(group.capacity)
  raise KeyError(f'no expert group or MoD layer has the auxiliary router {"/".join(path)}')


def _on_host(x) -> np.ndarray:
  """A global array's whole value on every process (gathered from the others where
  this process holds only some of its shards)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _set(params, values: dict[Path, np.ndarray]):
  """`params` with the thresholds of `values`, each placed where the old one was."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path, value in values.items():
    old = flat[(*path, aux_router.THRESHOLD)]
    new = np.asarray(value, old.dtype).reshape(old.shape)
    flat[(*path, aux_router.THRESHOLD)] = jax.device_put(
        new, old.sharding if isinstance(old, jax.Array) else None)
  return flax.traverse_util.unflatten_dict(flat)


def read(params) -> dict[Path, np.ndarray]:
  """{router path: its thresholds [R, E]} (logits)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {k[:-1]: _on_host(v) for k, v in flat.items() if k[-1] == aux_router.THRESHOLD}


def at_half(params):
  """`params` with every threshold 0: the paper's p > 0.5."""
  return _set(params, {p: np.zeros_like(v) for p, v in read(params).items()})


def quantile_thresholds(logits: np.ndarray, eligible: np.ndarray, c: float) -> np.ndarray:
  """Thresholds [R, E] such that a share c of each row's eligible tokens lies above.

  logits [T, E], eligible [T, R] bool (T tokens). A row without eligible tokens gets 0.
  """
  t = np.zeros((eligible.shape[-1], logits.shape[-1]), np.float64)
  for r in range(eligible.shape[-1]):
    values = logits[eligible[:, r]]
    if not len(values):
      continue
    t[r] = -np.inf if c >= 1 else np.quantile(values, 1.0 - c, axis=0)
  return t


Records = dict[Path, dict[str, np.ndarray]]


def _records(model: transformer.Decoder) -> Callable[[Any, Mapping[str, jax.Array]], Records]:
  """(params, batch) -> {router path: {'logits', 'margins' [T, E], 'eligible' [T, R],
  'modality' [T]}}: what each auxiliary router decided in causal mode (T tokens)."""
  causal = model.in_mode(causal=True)

  @jax.jit
  def run(params, batch):
    _, state = causal.apply({'params': params}, batch['tokens'], batch['modality'],
                            batch['segment_ids'], batch['positions'],
                            mutable=[aux_router.DECISIONS])
    return state[aux_router.DECISIONS]

  def records(params, batch) -> Records:
    # Per-token records of the global batch: gathered whole on every process.
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.tree.map(
        _on_host, run(params, batch))))
    out: Records = {}
    for key, value in flat.items():     # (*path, name) -> (array,), as sow keeps it
      a = np.asarray(value[0])
      out.setdefault(key[:-1], {})[key[-1]] = a.reshape(-1, *a.shape[-1:]) if (
          key[-1] != 'modality') else a.reshape(-1)
    return out
  return records


def _pooled(records: Callable[[Any, Mapping[str, jax.Array]], Records], params,
            batches: Sequence[Mapping[str, jax.Array]]) -> Records:
  """The records of every batch, concatenated per router."""
  seen: dict[Path, list[dict[str, np.ndarray]]] = {}
  for batch in batches:
    for path, rec in records(params, batch).items():
      seen.setdefault(path, []).append(rec)
  return {p: {k: np.concatenate([r[k] for r in recs]) for k in recs[0]}
          for p, recs in seen.items()}


def calibrate(model: transformer.Decoder, params, spec: routing_spec.RoutingSpec,
              batches: Sequence[Mapping[str, jax.Array]],
              on_pass: Callable[[int, int], None] | None = None):
  """`params` (model and auxiliary routers, merged) with compute-matched thresholds,
  calibrated on `batches`, all tokens pooled (module docstring); `on_pass(s, stages)`
  after each pass."""
  records = _records(model)
  params = at_half(params)
  stages = sorted({_stage_key(p) for p in router_paths(params)})
  for s, stage in enumerate(stages):
    pooled = _pooled(records, params, batches)
    params = _set(params, {
        path: quantile_thresholds(r['logits'], r['eligible'], capacity(spec, path))
        for path, r in pooled.items() if _stage_key(path) >= stage})
    if on_pass is not None:
      on_pass(s + 1, len(stages))
  return params


def measure(model: transformer.Decoder, params, batches: Sequence[Mapping[str, jax.Array]],
            modalities: Sequence[str]) -> dict[str, Any]:
  """What causal routing at `params`' thresholds does on `batches`, all tokens pooled:
    'share/{router path}' [E]: each output's share of the router's eligible tokens (an
        expert's of its group's, or a MoD layer's picked share);
    'share/{router path}/{modality}' [E]: the same among that modality's tokens;
    'eligible/{router path}/{modality}': how many of that modality's tokens it decided
        over, and 'taken/{router path}/{modality}' [E] how many each output took.
  """
  out: dict[str, Any] = {}
  for path, r in _pooled(_records(model), params, batches).items():
    site = names.RouterSite.of(path)
    eligible = r['eligible'].any(-1)                                        # [T]
    taken = (r['margins'] > 0) & eligible[:, None]                          # [T, E]
    out[names.share(site)] = (taken.sum(0) / max(eligible.sum(), 1)).tolist()
    for i, mod in enumerate(modalities):
      of_mod = r['modality'] == i
      count = int((eligible & of_mod).sum())
      out[names.eligible(site, mod)] = count
      out[names.taken(site, mod)] = (taken & of_mod[:, None]).sum(0).tolist()
      out[names.share(site, mod)] = ((taken & of_mod[:, None]).sum(0) / max(count, 1)).tolist()
  return out


def summary(params) -> dict[str, Any]:
  """{'threshold/{router path}': thresholds as probabilities, a nested list [R][E]}."""
  return {'threshold/' + '/'.join(p): (1 / (1 + np.exp(-v.astype(np.float64)))).tolist()
          for p, v in read(params).items()}
