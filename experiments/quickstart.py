"""Quickstart: a tiny early-fusion model on the embedded mixed-modal data (CPU, minutes).

Variants (`--config experiments/quickstart.py:VARIANT`, default moma_4t4i):
  dense          dense SwiGLU FFN, the compute-matched baseline
  moma_4t4i      MoMa, 4 text + 4 image experts, expert choice in each group
  moe_8x         expert choice over 8 experts, ignoring modality
  mod_moma_4t4i  MoMa 4t4i with mixture-of-depths every second layer

Data: a mixture of moma_shapes, moma_digits and moma_pydoc, built on first use into
~/.cache/moma_jax/data (about 15 s on a 2-core CPU):
  moma-data build   --config experiments/quickstart.py
  moma-data preview --config experiments/quickstart.py --out preview.png
FLOPs and parameters:
  moma-flops --config experiments/quickstart.py:mod_moma_4t4i
"""
from moma_jax import configs

VARIANTS = ('dense', 'moma_4t4i', 'moe_8x', 'mod_moma_4t4i')


def get_config(arg: str | None = None):
  variant = arg or 'moma_4t4i'
  if variant not in VARIANTS:
    raise ValueError(f'unknown quickstart variant {variant!r}; one of {", ".join(VARIANTS)}')
  c = configs.default_config()
  m = c.model
  m.d_model, m.num_heads, m.num_layers, m.ffn_dim = 128, 4, 4, 512
  m.max_len = c.data.seq_len = 128
  m.ffn = {'dense': 'dense', 'moe_8x': 'moe'}.get(variant, 'moma')
  m.experts = (8,) if variant == 'moe_8x' else (4, 4)
  m.mod.enabled = variant.startswith('mod_')
  c.train.batch_size = 16
  c.routing.group_size = 8
  return c
