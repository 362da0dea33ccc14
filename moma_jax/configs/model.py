"""`config.model`: the network, its experts and routers, kernels and dtypes.

Defaults, the block's validator, and the sizes derived from it (routing's own sizes:
moma_jax/model/routing_spec.py).
"""
from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from moma_jax.configs.checks import ConfigError, in_unit, one_of, positive

FFN_KINDS = ('dense', 'moma', 'moe', 'topk')
# Resolved per platform by moma_jax/model/kernels.py; remat: moma_jax/model/remat.py.
KERNELS = ('auto', 'xla', 'pallas')
ATTENTION = ('auto', 'xla', 'splash', 'flash', 'cudnn', 'tokamax')
REMAT = ('none', 'block_input', 'matmuls', 'block_outputs', 'offload')
ROUTER_NOISE = ('none', 'gumbel', 'gumbel_scaled')


def defaults() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 773                    # 5 specials + 256 bytes + 512 VQ codes
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.ffn_dim = 256                       # the paper's ffn; SwiGLU hidden is 2/3 of it
  m.ffn_hidden = config_dict.placeholder(int)  # None = round(2/3 * ffn_dim)
  m.max_len = 128
  # One expert group per modality (moma); the data pipeline's tokenizers are named
  # after them (moma_jax/data/pipeline.py), and special tokens count as the first.
  m.modalities = ('text', 'image')
  m.ffn = 'moma'
  m.experts = (4, 4)
  m.capacity = config_dict.placeholder(tuple)
  m.top_k = 2                           # topk only
  m.topk_capacity_factor = 1.25         # topk only: per-expert buffer = cf * k * N / E
  m.load_balance_weight = 0.01          # topk only
  m.router = 'sigmoid'
  # Router noise in training (expert-choice groups): 'gumbel' is the paper's
  # Gumbel-sigmoid, sigmoid(z + G' - G''), logistic noise of std pi/sqrt(3) ~ 1.81;
  # 'gumbel_scaled' the same noise scaled so that its std equals each expert's logit std
  # over the group's eligible tokens (moma_jax/model/routing.py).
  m.router_noise = 'none'
  m.norm = 'post'
  m.mod = ml_collections.ConfigDict(dict(
      enabled=False, capacity=0.25, every=2, first=0, modality_aware=False))
  # Auxiliary routers for causal inference. 'joint' (with enabled=True): trained alongside
  # the model on stop-gradient inputs. 'post_hoc' (the paper's): trained after the model
  # by `moma-aux`, whatever `enabled` says; the training run carries none.
  m.aux_router = ml_collections.ConfigDict(dict(enabled=False, mode='post_hoc'))
  m.kernels = 'auto'                    # 'auto' | 'xla' | 'pallas': moma_jax/model/kernels.py
  m.attention = 'auto'                  # one of ATTENTION: moma_jax/model/kernels.py
  m.matmul_tiles = 'auto'               # TPU grouped matmul tiles: 'auto' (chosen for the
                                        # shapes, pallas_kernels/megablox_tiles.py) or TMxTKxTN
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  m.remat = 'none'                      # what a layer keeps for backward: moma_jax/model/remat.py
  return m


def validate(m: ml_collections.ConfigDict) -> None:
  """ConfigError for a `config.model` that cannot describe a model."""
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'ffn_dim', 'max_len'):
    positive(f'model.{name}', m[name])
  if m.ffn_hidden is not None:
    positive('model.ffn_hidden', m.ffn_hidden)
  if m.d_model % m.num_heads:
    raise ConfigError('model.num_heads', f'{m.num_heads} heads do not divide d_model={m.d_model}')
  if (m.d_model // m.num_heads) % 2:
    raise ConfigError('model.num_heads', 'head dimension d_model/num_heads must be even (RoPE)')
  if not m.modalities or len(set(m.modalities)) != len(m.modalities):
    raise ConfigError('model.modalities', f'must be distinct names, got {m.modalities!r}')
  if len(m.modalities) > 127:
    raise ConfigError('model.modalities', 'at most 127 modalities (stored as int8)')
  one_of('model.ffn', m.ffn, FFN_KINDS)
  one_of('model.router', m.router, ('sigmoid', 'softmax'))
  one_of('model.router_noise', m.router_noise, ROUTER_NOISE)
  one_of('model.norm', m.norm, ('post', 'pre'))
  one_of('model.kernels', m.kernels, KERNELS)
  one_of('model.attention', m.attention, ATTENTION)
  matmul_tiles(m)
  one_of('model.dtype', m.dtype, ('float32', 'bfloat16'))
  one_of('model.param_dtype', m.param_dtype, ('float32', 'bfloat16'))
  one_of('model.remat', m.remat, REMAT)
  one_of('model.aux_router.mode', m.aux_router.mode, ('post_hoc', 'joint'))
  if m.aux_router.enabled and m.ffn in ('dense', 'topk') and not m.mod.enabled:
    raise ConfigError('model.aux_router.enabled', f'a {m.ffn} model without mixture-of-'
                      'depths routes causally already; it has no auxiliary routers')
  for cap in m.capacity or ():
    in_unit('model.capacity', cap)
  if m.ffn != 'dense':
    _validate_experts(m)
  if m.mod.enabled:
    in_unit('model.mod.capacity', m.mod.capacity)
    positive('model.mod.every', m.mod.every)
    if not isinstance(m.mod.first, int) or not 0 <= m.mod.first < m.num_layers:
      raise ConfigError('model.mod.first', f'must be a layer index in [0, {m.num_layers}), '
                        f'got {m.mod.first!r}')


def _validate_experts(m: ml_collections.ConfigDict) -> None:
  """The expert counts and capacities of a routed FFN (moma, moe or topk)."""
  experts = tuple(m.experts)
  want = len(m.modalities) if m.ffn == 'moma' else 1
  if len(experts) != want:
    raise ConfigError('model.experts', f'{m.ffn} needs {want} entr{"y" if want == 1 else "ies"}'
                      f' (one per {"modality" if m.ffn == "moma" else "layer"}), got {experts!r}')
  for e in experts:
    positive('model.experts', e)
  if m.capacity is not None and len(m.capacity) not in (1, want):
    raise ConfigError('model.capacity', f'needs 1 or {want} entries, got {m.capacity!r}')
  if m.ffn == 'topk':
    positive('model.top_k', m.top_k)
    if m.top_k > experts[0]:
      raise ConfigError('model.top_k', f'{m.top_k} exceeds the {experts[0]} experts')
    if not m.topk_capacity_factor > 0:
      raise ConfigError('model.topk_capacity_factor',
                        f'must be > 0, got {m.topk_capacity_factor}')


_TILES = re.compile(r'(\d+)x(\d+)x(\d+)')


def matmul_tiles(m: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
  """`model.matmul_tiles` as (TM, TK, TN), None for 'auto'. TPU blocks: TM a multiple
  of 16 (bf16 packs two rows a sublane), TK and TN of 128 (lanes)."""
  text = m.get('matmul_tiles', 'auto')
  if text == 'auto':
    return None
  found = _TILES.fullmatch(str(text))
  tiles = tuple(int(g) for g in found.groups()) if found else None
  if tiles is None or not tiles[0] or tiles[0] % 16 or tiles[1] % 128 or tiles[2] % 128:
    raise ConfigError('model.matmul_tiles', "must be 'auto' or TMxTKxTN with TM a positive "
                      f'multiple of 16 and TK, TN of 128 (e.g. 512x512x1024), got {text!r}')
  return tiles


def ffn_hidden(m: ml_collections.ConfigDict) -> int:
  """SwiGLU hidden width: `model.ffn_hidden`, or round(2/3 * ffn_dim)."""
  if m.ffn_hidden is not None:
    return int(m.ffn_hidden)
  return max(1, int(round(2 * m.ffn_dim / 3)))


def ffn_label(m: ml_collections.ConfigDict) -> str:
  """The FFN kind for people: 'dense', or the kind and its experts, 'moma (4, 4)'."""
  return m.ffn if m.ffn == 'dense' else f'{m.ffn} {tuple(m.experts)}'


def mod_layers(m: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """For each layer, whether it is a mixture-of-depths layer."""
  mod = m.mod
  if not mod.enabled:
    return (False,) * m.num_layers
  return tuple(i >= mod.first and (i - mod.first) % mod.every == 0
               for i in range(m.num_layers))


def looks_ahead(m: ml_collections.ConfigDict) -> bool:
  """Whether teacher-forced routing compares tokens of a routing group (expert choice
  or MoD), so that causal inference needs auxiliary routers."""
  return m.ffn in ('moma', 'moe') or bool(m.mod.enabled)


def has_joint_aux_routers(m: ml_collections.ConfigDict) -> bool:
  """Whether the training run itself carries (and trains) auxiliary routers."""
  a = m.aux_router
  return bool(a.enabled and a.mode == 'joint' and looks_ahead(m))
