"""Configuration schema, defaults and validation.

One `ml_collections.ConfigDict` describes a run. `default_config()` holds every field
with its default; experiment files (`experiments/*.py`, `get_config(arg)`) start from it
and change what they need. `validate(config)` checks the whole thing and raises
`ConfigError` naming the offending field, so a command-line tool can print one line.

Each block has one module holding its defaults, its validator and what is derived from
it: model.py, routing.py, data.py, train.py, mesh.py, upcycle.py. The names other parts
rely on:
  model.ffn        'dense' | 'moma' (one expert group per modality) | 'moe' (expert choice
                   over all tokens) | 'topk' (token choice with a capacity factor).
  model.experts    experts per group: one entry per modality for moma ((1, 1) is 1t1i,
                   (4, 4) is 4t4i), one entry for moe/topk ((8,) is moe_8x).
  model.capacity   per group, the fraction c of the group's tokens each expert takes;
                   None means 1/E for every group; a 1-tuple applies to all groups.
  model.mod.*      mixture-of-depths: capacity c_d, layer pattern (every, first).
  model.kernels, model.attention
                   the backends of routing and attention, 'auto' per platform
                   (moma_jax/model/kernels.py).
  model.matmul_tiles  megablox's tiles on TPU: 'auto' (chosen for the shapes,
                   pallas_kernels/megablox_tiles.py) or 'TMxTKxTN' (`matmul_tiles()`).
  model.remat      what each layer keeps for the backward pass (moma_jax/model/remat.py).
  routing.*        routing group size and row layout (see moma_jax/model/routing.py).
  upcycle.*        from_workdir: a 1t1i MoMa run whose step `at_step` (> 0) a new run
                   starts from, its FFNs copied into every expert (moma_jax/training/upcycle.py);
                   optimizer: 'restart' (the paper's) or 'carry' the source's.
"""
from __future__ import annotations

import ml_collections

from moma_jax import renamed_fields
from moma_jax.configs import data as data_block
from moma_jax.configs import mesh as mesh_block
from moma_jax.configs import model as model_block
from moma_jax.configs import routing as routing_block
from moma_jax.configs import train as train_block
from moma_jax.configs import upcycle as upcycle_block
# What the other packages use, named once here.
from moma_jax.configs.checks import ConfigError
from moma_jax.configs.compare import first_difference
from moma_jax.configs.data import dataset_options, mixture
from moma_jax.configs.local import shrink_for_cpu
from moma_jax.configs.model import (ATTENTION, FFN_KINDS, KERNELS, REMAT, ffn_hidden,
                                    ffn_label, has_joint_aux_routers, looks_ahead,
                                    matmul_tiles, mod_layers)
from moma_jax.configs.routing import LAYOUTS
from moma_jax.configs.upcycle import carried_updates

__all__ = ['ATTENTION', 'FFN_KINDS', 'KERNELS', 'LAYOUTS', 'REMAT', 'ConfigError',
           'carried_updates', 'dataset_options', 'default_config', 'ffn_hidden', 'ffn_label',
           'first_difference', 'has_joint_aux_routers', 'looks_ahead', 'matmul_tiles',
           'mixture', 'mod_layers', 'shrink_for_cpu', 'validate']


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default: a tiny 4t4i MoMa that runs on a CPU."""
  c = ml_collections.ConfigDict()
  # True: shrink the experiment to run in minutes on a CPU (see `shrink_for_cpu`).
  c.runlocal = False
  c.model = model_block.defaults()
  c.routing = routing_block.defaults()
  c.data = data_block.defaults()
  c.train = train_block.defaults()
  c.mesh = mesh_block.defaults()
  c.upcycle = upcycle_block.defaults()
  return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError (naming the field) if `config` cannot describe a run; returns
  it. Each block is checked by its own module, given the blocks its fields depend on."""
  try:
    renamed_fields.refuse(renamed_fields.fields(config.to_dict()))
  except renamed_fields.RenamedFieldError as e:
    raise ConfigError(e.field, e.message) from None
  m = config.model
  model_block.validate(m)
  routing_block.validate(config.routing, m)
  train_block.validate(config.train, config.routing)
  data_block.validate(config.data, m)
  mesh_block.validate(config.mesh)
  upcycle_block.validate(config.upcycle, m)
  return config
