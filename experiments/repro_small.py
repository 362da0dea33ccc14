"""A small-scale reproduction of the MoMa paper's FLOPs-savings findings (docs/REPRODUCTION.md).

Variants (`--config experiments/repro_small.py:VARIANT[,seed=S]`):
  dense       the compute-matched dense baseline
  1t1i        MoMa, one text and one image expert
  4t4i        MoMa, 4 text + 4 image experts
  moe_8x      expert choice over 8 experts, ignoring modality
  mod_1t1i    1t1i in a mixture-of-depths model (every 2nd layer, c_d 0.25)
  mod_4t4i    4t4i in a mixture-of-depths model
  mod_4t4i_aware   mod_4t4i with modality-aware MoD (c_d of each modality's tokens)
  up_4t4i     4t4i upcycled from the 1t1i run at step UPCYCLE_STEP, trained for the
              remaining STEPS - UPCYCLE_STEP steps (same total FLOPs), the paper's
              recipe: Gumbel-sigmoid router noise, optimizer and LR schedule restarted;
              the source run is named on the command line:
              --config.upcycle.from_workdir=RUNS/1t1i
  up_4t4i_carry, up_4t4i_nonoise, up_4t4i_scaled, up_4t4i_at100
              up_4t4i with one change each (UPCYCLED): the source's optimizer and
              schedule carried on; no router noise; the noise scaled to the router
              logits' spread; upcycled at step 100 and trained 500 steps after
  up_4t4i_at100_nonoise   both of the last two changes
Every sparse variant costs its dense model's forward FLOPs per token (routers aside);
the MoD models are deeper, at the depth whose FLOPs per token match the dense model's
(`moma_jax.analysis.flops.mod_layers_matching`). `seed=S` changes the initialization and the
data order (train.seed, data.seed); for an upcycled variant only train.seed (its fresh
routers and router noise), since it continues its source's data stream.

Data: moma_shapes with enough scenes that no scene is seen twice, plus moma_pydoc text
in a fixed mixture; evaluation on both validation splits, mixed and packed as training's
batches.

The whole study (all variants, second seeds, the per-split diagnostic, post-hoc
auxiliary routers and causal evaluation, then the comparison) is one command:
  bash experiments/repro_small.sh [RUNS_DIR]      # default runs/repro_small
"""
import ml_collections

from moma_jax.analysis import flops
from moma_jax import configs
from moma_jax import variants

UPCYCLE_STEP = 300
# The upcycled variants: the paper's recipe, and one change of it each (the controls of
# docs/REPRODUCTION.md's upcycling section).
RECIPE = dict(at_step=UPCYCLE_STEP, optimizer='restart', router_noise='gumbel')
UPCYCLED = {
    'up_4t4i': {},
    'up_4t4i_carry': dict(optimizer='carry'),
    'up_4t4i_nonoise': dict(router_noise='none'),
    'up_4t4i_scaled': dict(router_noise='gumbel_scaled'),
    'up_4t4i_at100': dict(at_step=100),
    'up_4t4i_at100_nonoise': dict(at_step=100, router_noise='none'),
}
VARIANTS = ('dense', '1t1i', '4t4i', 'moe_8x', 'mod_1t1i', 'mod_4t4i', 'mod_4t4i_aware',
            *UPCYCLED)
# The model variant each study variant builds on (variants.parse), when not its own name.
BASE = {'mod_4t4i_aware': 'mod_4t4i', **{name: '4t4i' for name in UPCYCLED}}

D_MODEL, HEADS, LAYERS, FFN = 128, 4, 4, 512
SEQ_LEN, BATCH, STEPS = 256, 16, 600
# Scenes drawn for training: more than a run reads (about 18k, in 12.9k documents of
# 1.39 scenes), so none repeats. moma_pydoc has 460 documents; at this share a run reads
# about 467 of them (measured mean document lengths 162 and 812 tokens), about one pass.
SHAPES_TRAIN = 60_000
MIXTURE = 'moma_shapes:0.965,moma_pydoc:0.035'


def _dense_depth_config() -> ml_collections.ConfigDict:
  c = configs.default_config()
  m = c.model
  m.d_model, m.num_heads, m.num_layers, m.ffn_dim = D_MODEL, HEADS, LAYERS, FFN
  m.max_len = c.data.seq_len = SEQ_LEN
  m.ffn = 'dense'
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _, rest = (arg or '4t4i').partition(',')
  seed = 0
  if rest:
    key, _, value = rest.partition('=')
    if key != 'seed' or not value.isdigit():
      raise ValueError(f'expected VARIANT[,seed=S], got {arg!r}')
    seed = int(value)
  if variant not in VARIANTS:
    raise ValueError(f'unknown repro_small variant {variant!r}; one of {", ".join(VARIANTS)}')
  c = _dense_depth_config()
  m = c.model
  parsed = variants.parse(BASE.get(variant, variant))
  variants.apply(parsed, m)
  m.mod.modality_aware = variant == 'mod_4t4i_aware'
  if parsed.mod:
    m.num_layers = flops.mod_layers_matching(c)
  c.routing.group_size = 8
  # The capacity layout (one batched matmul, fast on a CPU) with buffers that hold every
  # row expert choice can ask for: ceil(f * c_m * 1/2 * N) >= ceil(c_m * b_m) for moma at
  # f = 2 (expected share 1/2 per modality), and for moe at f = 1 (one group of all
  # tokens). So nothing is cut: the paper's semantics, exactly (route/dropped/* = 0).
  c.routing.layout = 'capacity'
  c.routing.buffer_factor = 1.0 if m.ffn == 'moe' else 2.0
  c.data.name = 'mixture'
  c.data.mixture = MIXTURE
  c.data.options = f'moma_shapes:num_train={SHAPES_TRAIN}:num_validation=400'
  c.data.seed = 0 if variant in UPCYCLED else seed
  t = c.train
  t.seed = seed
  t.batch_size, t.steps, t.lr, t.warmup, t.schedule = BATCH, STEPS, 1e-3, 60, 'linear'
  t.log_every, t.eval_every, t.ckpt_every, t.eval_max_batches = 10, 100, 100, 24
  t.keep = STEPS // t.ckpt_every   # every checkpoint: upcycling starts from a mid-run step
  if variant in UPCYCLED:
    recipe = {**RECIPE, **UPCYCLED[variant]}
    c.upcycle.at_step, c.upcycle.optimizer = recipe['at_step'], recipe['optimizer']
    t.steps = STEPS - recipe['at_step']
    m.router_noise = recipe['router_noise']
  return c
