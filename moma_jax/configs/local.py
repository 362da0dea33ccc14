"""`runlocal=True`: a paper-size experiment shrunk to run in minutes on a CPU."""
from __future__ import annotations

from typing import Collection

import ml_collections

from moma_jax.configs import model as model_block


def shrink_for_cpu(config: ml_collections.ConfigDict,
                   keep: Collection[str] = ()) -> ml_collections.ConfigDict:
  """The same kind of model (FFN kind, experts, capacities, MoD pattern) at d_model 64
  and at most 4 layers, on the embedded data's vocabulary, for 100 short steps. Fields
  named in `keep` (the command line's own overrides) are left as they are.
  Changes `config` in place."""
  m = config.model
  group = min(config.routing.group_size, 8)
  layers = min(m.num_layers, 4 if m.mod.enabled else 2)
  small = {
      'model.d_model': 64, 'model.num_heads': 4, 'model.ffn_dim': 256,
      'model.ffn_hidden': None, 'model.num_layers': layers,
      'model.mod.first': min(m.mod.first, layers - 1),
      'model.vocab_size': model_block.defaults().vocab_size,
      'model.max_len': 128, 'data.seq_len': 128, 'routing.group_size': group,
      'train.batch_size': 2 * group, 'train.grad_accum': 1, 'train.steps': 100,
      'train.warmup': 10, 'train.lr': 1e-3, 'train.log_every': 5,
      'train.eval_every': 50, 'train.ckpt_every': 50, 'train.eval_max_batches': 12}
  for path, value in small.items():
    if path not in keep:
      *parents, leaf = path.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config
