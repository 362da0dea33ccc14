"""A training run's directory read back: its config, model and parameters.

  run = moma_jax.load('runs/quickstart/moma_4t4i')       # newest checkpoint
  run = moma_jax.load(workdir, step=200)
  logits = run.model.apply({'params': run.params}, tokens, modality, segment_ids, positions)

  run = moma_jax.load(workdir, mesh=mesh)    # a run larger than one device, sharded
  with jax.set_mesh(run.mesh), sharding.axis_rules():
    ...                                       # batches: sharding.global_batch

Only the parameters are read: the checkpoint's optimizer moments stay on disk. They are
placed on `mesh` by the training rules (moma_jax/model/sharding.py: embed over 'fsdp',
experts over 'expert', mlp/heads/vocab over 'tensor'), so each device reads and holds
its shards only; without a mesh, on this process's first device. The reading itself
(config, checkpoint list, parameters) is moma_jax/runs/saved.py's, whose `mesh_for`
builds the mesh of the `--config.mesh.*` flags of moma-eval, moma-aux and moma-generate.

The directory holds `config.json` and `checkpoints/` as `moma-train` writes them, and
`aux_router/` once `moma-aux` has trained post-hoc auxiliary routers on that checkpoint:
the loaded model then carries them (`run.model.mode.aux_routers`), so that
`run.model.in_mode(causal=True)` decodes causally, at threshold 0.5 unless
`causal_thresholds='calibrated'` asks for the stage's compute-matched thresholds
(moma_jax/inference/thresholds.py). Reading never changes the directory.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from moma_jax import run_dir
from moma_jax.inference import aux_store
from moma_jax.inference import thresholds
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import saved
from moma_jax.runs import state as train_state


@dataclasses.dataclass(frozen=True)
class SavedRun:
  workdir: str
  config: ml_collections.ConfigDict
  model: transformer.Decoder
  params: Any                   # the model's parameters, global arrays placed on `mesh`
  step: int                     # the checkpoint's training step
  progress: dict[str, Any]      # train_flops, tokens, data position, ... at that step
  mesh: jax.sharding.Mesh       # where `params` live: run under jax.set_mesh(mesh)


def load(workdir: str, step: int | None = None, with_aux_routers: bool = True,
         causal_thresholds: str = thresholds.HALF,
         mesh: jax.sharding.Mesh | None = None) -> SavedRun:
  """The run in `workdir` at checkpoint `step` (None: the newest), with the auxiliary
  routers of the post-hoc stage trained on that step if there is one (and
  `with_aux_routers`). causal_thresholds: 'half' (the paper's p > 0.5, the default) or
  'calibrated' (the stage's compute-matched thresholds; RunDirError without a stage).
  mesh: where the parameters (and auxiliary routers) are placed, by the training rules;
  None: this process's first device. Only the parameters are read, not the optimizer
  state."""
  if causal_thresholds not in thresholds.CHOICES:
    raise ValueError(f'causal_thresholds must be one of {thresholds.CHOICES}, got '
                     f'{causal_thresholds!r}')
  mesh = sharding.one_device_mesh() if mesh is None else mesh
  workdir, config, step, params, progress = saved.read_params(workdir, step, mesh)
  model = transformer.build(config)
  result = aux_store.read_result(workdir)
  staged = with_aux_routers and result is not None and result['run_step'] == step
  if staged:
    # Post-hoc routers join the model; a joint run's come back with their thresholds.
    model = transformer.build(config, aux_routers=True)
    target = aux_store.split(train_state.abstract_params(model, mesh))[1]
    params = aux_store.merge(params, aux_store.restore(workdir, target))
  if causal_thresholds == thresholds.CALIBRATED and not staged:
    raise run_dir.RunDirError(f'{workdir} has no calibrated causal thresholds for step '
                              f'{step}: moma-aux --workdir {workdir}')
  if model.mode.aux_routers and causal_thresholds == thresholds.HALF:
    params = thresholds.at_half(params)
  return SavedRun(workdir, config, model, params, step, progress, mesh)
