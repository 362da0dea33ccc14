"""A training run's directory read back: its config, model and parameters.

  run = moma_jax.load('runs/quickstart/moma_4t4i')       # newest checkpoint
  run = moma_jax.load(workdir, step=200)
  logits = run.model.apply({'params': run.params}, tokens, modality, segment_ids, positions)

The directory holds `config.json` and `checkpoints/` as `moma-train` writes them, and
`aux_router/` once `moma-aux` has trained post-hoc auxiliary routers on that checkpoint:
the loaded model then carries them (`run.model.aux_routers`), so that
`run.model.clone(causal=True)` decodes causally, at threshold 0.5 unless
`causal_thresholds='calibrated'` asks for the stage's compute-matched thresholds
(moma_jax/inference/thresholds.py). Reading never changes the directory.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from moma_jax import configs
from moma_jax.inference import aux_store
from moma_jax.inference import thresholds
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax import run_dir
from moma_jax.training import checkpoint as ckpt_lib
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.training import state as train_state



def _as_tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config schema uses."""
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def _merge(base: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for key, value in saved.items():
    out[key] = _merge(base[key], value) if isinstance(base.get(key), dict) else value
  return out


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's validated config: `config.json` over today's defaults (a field added to
  the schema since the run was made takes its default)."""
  saved = run_dir.read_config_json(workdir)
  merged = _merge(configs.default_config().to_dict(), _as_tuples(saved))
  return configs.validate(ml_collections.ConfigDict(merged))


def abstract_state(config: ml_collections.ConfigDict, model: transformer.Decoder):
  """{'params', 'opt'} as ShapeDtypeStructs on this process's first device: the
  structure a checkpoint restores into, whatever mesh saved it."""
  placed, _ = train_state.layout(model, optimizer_lib.optimizer(config),
                                 sharding.one_device_mesh())
  return placed


@dataclasses.dataclass(frozen=True)
class SavedRun:
  workdir: str
  config: ml_collections.ConfigDict
  model: transformer.Decoder
  params: Any                   # the model's parameters, a pytree of arrays
  step: int                     # the checkpoint's training step
  progress: dict[str, Any]      # train_flops, tokens, data position, ... at that step


def load(workdir: str, step: int | None = None, with_aux_routers: bool = True,
         causal_thresholds: str = thresholds.HALF) -> SavedRun:
  """The run in `workdir` at checkpoint `step` (None: the newest), with the auxiliary
  routers of the post-hoc stage trained on that step if there is one (and
  `with_aux_routers`). causal_thresholds: 'half' (the paper's p > 0.5, the default) or
  'calibrated' (the stage's compute-matched thresholds; RunDirError without a stage)."""
  if causal_thresholds not in thresholds.CHOICES:
    raise ValueError(f'causal_thresholds must be one of {thresholds.CHOICES}, got '
                     f'{causal_thresholds!r}')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise run_dir.RunDirError(f'no such run directory: {workdir}')
  config = read_config(workdir)
  if not ckpt_lib.has_checkpoints(workdir):
    raise run_dir.RunDirError(f'{workdir} has no checkpoint yet')
  ckpts = ckpt_lib.Checkpoints(workdir)
  try:
    steps = ckpts.all_steps()
    step = max(steps) if step is None else step
    if step not in steps:
      raise run_dir.RunDirError(f'{workdir} has no checkpoint of step {step}; it has '
                        f'{", ".join(map(str, sorted(steps)))}')
    model = transformer.build(config)
    state, progress = ckpts.restore(step, abstract_state(config, model))
  finally:
    ckpts.close()
  params = state['params']
  result = aux_store.read_result(workdir)
  staged = with_aux_routers and result is not None and result['run_step'] == step
  if staged:
    # Post-hoc routers join the model; a joint run's come back with their thresholds.
    model = transformer.build(config, aux_routers=True)
    shapes = jax.eval_shape(lambda: transformer.init(model, jax.random.key(0))[0])
    params = aux_store.merge(params, aux_store.restore(workdir, aux_store.split(shapes)[1]))
  if causal_thresholds == thresholds.CALIBRATED and not staged:
    raise run_dir.RunDirError(f'{workdir} has no calibrated causal thresholds for step '
                              f'{step}: moma-aux --workdir {workdir}')
  if model.aux_routers and causal_thresholds == thresholds.HALF:
    params = thresholds.at_half(params)
  return SavedRun(workdir, config, model, params, step, progress)
