"""Where a run's post-hoc auxiliary routers live: `RUN/aux_router/`.

  params/        Orbax checkpoint of the auxiliary routers' parameters, and only them
                 (their compute-matched thresholds included)
  metrics.jsonl  the stage's training rows and its evaluation row
  result.json    the evaluation, written last: its presence means the stage finished,
                 and `run_step` names the checkpoint of the run it was trained on

Auxiliary-router parameters are those under a module named `aux_router*`
(`param_names.role`); `split` and `merge` separate them from the model's. Under several
processes every one takes part in saving the arrays, and process 0 alone touches
result.json.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp

from moma_jax.model import param_names
from moma_jax import run_dir

AUX_DIR = 'aux_router'
PARAMS_DIR = 'params'
RESULT_FILE = 'result.json'
# A result without it comes from a stage before calibrated thresholds: not reusable.
CALIBRATED_KEY = 'eval_causal_calibrated/loss'


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), AUX_DIR)


def split(params) -> tuple[dict[str, Any], dict[str, Any]]:
  """(model parameters, auxiliary-router parameters), two nested dicts."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  main = {k: v for k, v in flat.items() if param_names.role(k) != 'aux_router'}
  aux = {k: v for k, v in flat.items() if param_names.role(k) == 'aux_router'}
  return (flax.traverse_util.unflatten_dict(main), flax.traverse_util.unflatten_dict(aux))


def merge(main, aux) -> dict[str, Any]:
  """The inverse of `split`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(main))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(aux)))
  return flax.traverse_util.unflatten_dict(flat)


def read_result(workdir: str) -> dict[str, Any] | None:
  """The finished stage's result.json, or None if the stage has not finished (or its
  file cannot be read, or it predates calibrated thresholds, which a warning says: the
  stage then counts as not done)."""
  path = os.path.join(directory(workdir), RESULT_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      result = json.load(f)
    int(result['run_step'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    print(f'warning: ignoring unreadable {path} ({e!r})', file=sys.stderr)
    return None
  if CALIBRATED_KEY not in result:
    print(f'warning: ignoring {path}: its stage has no calibrated thresholds (moma-aux '
          'again)', file=sys.stderr)
    return None
  return result


def mark_unfinished(workdir: str) -> None:
  """Removes result.json: from now until `save`, the stage is not finished."""
  path = os.path.join(directory(workdir), RESULT_FILE)
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)


def save(workdir: str, aux_params, result: dict[str, Any]) -> None:
  """Writes params/ (replacing an earlier one), then result.json (atomically)."""
  root = directory(workdir)
  os.makedirs(root, exist_ok=True)
  mark_unfinished(workdir)        # the params about to be replaced are not its result's
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(root, PARAMS_DIR), aux_params, force=True)
    ckpt.wait_until_finished()
  if jax.process_index() == 0:
    run_dir.write_json(os.path.join(root, RESULT_FILE), result)


def restore(workdir: str, abstract_aux) -> Any:
  """The saved auxiliary-router parameters, shaped like `abstract_aux`
  (ShapeDtypeStructs) and placed by their shardings."""
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.join(directory(workdir), PARAMS_DIR), abstract_aux)
