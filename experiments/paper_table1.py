"""The model sizes of the MoMa paper's Table 1 (Lin et al. 2024), dense and sparse.

`get_config(arg)`, arg = [mod_]{dense | moe_8x | moma_<n>t<m>i}_{90m | 435m | 1.4b}:
  dense      the dense baseline;
  moe_8x     expert choice over 8 experts ignoring modality, every layer;
  moma_4t4i  4 text experts + 4 image experts, every layer (moma_1t1i: one each);
  mod_...    the same FFN in the mixture-of-depths model of that size (more layers,
             every 2nd layer from layer 0 is a MoD layer with capacity c_d = 0.25).
Sizes (layers / d_model / ffn / heads; SwiGLU hidden = 2/3 ffn, ffn = 4 d):
  dense: 90m 8/512/2048/8, 435m 24/1024/4096/16, 1.4b 24/2048/8192/16;
  MoD:   90m 14/512/2048/8, 435m 40/1024/4096/16, 1.4b 32/2304/9216/18.
Vocabulary 65,536, untied embeddings, sequence length 4096. Training as in the paper:
AdamW, lr 1e-4, 4,000 warm-up steps, linear decay to 1%, a budget of 1T tokens. The
paper's exact global batch is not restated here: we use 512 sequences (2.1M tokens) per
step, so 1T tokens take 476,838 steps; change `train.batch_size` / `train.steps` to
match your hardware and budget.

Run:
  moma-flops --config experiments/paper_table1.py:moma_4t4i_435m
  moma-train --config experiments/paper_table1.py:moma_4t4i_1.4b --workdir runs/moma_1.4b
On a CPU, the same experiment shrunk to d_model 64 and 100 steps (about a minute on
two cores; the training loss falls from about 7.1 to about 3.2, eval loss about 3.5):
  moma-train --config experiments/paper_table1.py:moma_4t4i_1.4b \
      --workdir /tmp/moma_local --config.runlocal=True

Expected total parameters, as moma-flops prints them (the paper's, in
brackets; ours are within 0.05%: norms and QK-norms are counted, and SwiGLU's
3 * d * round(2/3 ffn) differs by a hair from the paper's 2 * d * ffn):
                 90m               435m                1.4b
  dense          92.3M  (92.3)     436.3M  (436.2)     1476.5M  (1476.4)
  moe_8x         209.7M (209.7)    1845.9M (1845.5)    7113.6M  (7113.5)
  moma_4t4i      209.7M            1845.9M             7113.6M
  moma_1t1i      109.1M            637.7M              2281.8M
  mod_dense      111.2M (111.1)    637.7M  (637.5)     2340.6M  (2340.4)
  mod_moe_8x     316.7M (316.7)    2987.1M (2986.3)    11853.9M (11853.1)
  mod_moma_1t1i  140.5M            973.4M              3699.7M
moma_4t4i has moe_8x's parameters (two 4-way routers weigh as much as one 8-way);
moma_1t1i has the dense model's plus one FFN per layer. With the paper's capacities
every sparse model costs its dense model's forward FLOPs per token (routers aside).
At 90m and 435m the MoD depths (14, 40) are the FLOPs-matched ones
(`moma_jax.analysis.flops.mod_layers_matching` of the dense config); the 1.4b MoD model is
wider (d 2304), and 32 layers of it cost 3.17 GFLOPs/token forward vs the dense 1.4b's 3.09.
"""
import ml_collections

from moma_jax import configs
from moma_jax import variants

# size -> (layers, d_model, heads) for the dense and the mixture-of-depths models.
DENSE_SIZES = {'90m': (8, 512, 8), '435m': (24, 1024, 16), '1.4b': (24, 2048, 16)}
MOD_SIZES = {'90m': (14, 512, 8), '435m': (40, 1024, 16), '1.4b': (32, 2304, 18)}

TOKEN_BUDGET = 10**12                   # training tokens, as in the paper
BATCH_SEQUENCES = 512                   # x 4096 = 2.1M tokens per step

VARIANTS_HELP = ('[mod_]{dense|moe_8x|moma_<n>t<m>i}_{90m|435m|1.4b}, e.g. dense_90m, '
                 'moe_8x_435m, moma_4t4i_1.4b, mod_moma_1t1i_90m')


def _parse(arg: str | None) -> tuple[variants.Variant, str]:
  """(variant, size) of a Table 1 name; ValueError listing VARIANTS_HELP if it is none.

  Only the paper's spellings: its one MoE (8 experts) and MoMa written moma_<n>t<m>i.
  """
  body, _, size = (arg or '').rpartition('_')
  try:
    variant = variants.parse(body)
  except ValueError:
    variant = None
  if (variant is None or size not in DENSE_SIZES or variant.name != body
      or (variant.ffn == 'moe' and variant.experts != (8,))):
    raise ValueError(f'unknown variant {arg!r} of paper_table1.py; valid: {VARIANTS_HELP}')
  return variant, size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The Table 1 model named by `arg` (see the module docstring)."""
  variant, size = _parse(arg)

  c = configs.default_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads = (MOD_SIZES if variant.mod else DENSE_SIZES)[size]
  m.ffn_dim = 4 * m.d_model
  m.vocab_size = 65_536
  m.max_len = 4096
  variants.apply(variant, m)            # a moma variant checks for (text, image)
  m.capacity = None                     # 1/E per group: one expert's worth per token
  m.mod.capacity, m.mod.every, m.mod.first = 0.25, 2, 0

  c.data.seq_len = 4096
  c.routing.group_size = 8              # sequences per routing group
  t = c.train
  t.batch_size = BATCH_SEQUENCES
  t.steps = -(-TOKEN_BUDGET // (BATCH_SEQUENCES * c.data.seq_len))
  t.lr, t.warmup, t.schedule = 1e-4, 4000, 'linear'
  t.log_every, t.eval_every, t.ckpt_every, t.keep = 100, 5000, 2000, 3
  t.eval_max_batches = 192             # mixed evaluation batches (64 per dataset)
  return c
