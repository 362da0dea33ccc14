"""Model variant names, as experiment files take them in `--config FILE:VARIANT`.

Grammar: `[mod_]{dense|moe_<E>x|moma_<n>t<m>i|<n>t<m>i}`.

  dense          the dense SwiGLU FFN
  moe_<E>x       expert choice over E experts, ignoring modality (moe_8x)
  moma_<n>t<m>i  MoMa: n text experts and m image experts (moma_4t4i)
  <n>t<m>i       the same MoMa model, shorter (4t4i)
  mod_...        any of these in a mixture-of-depths model (mod_moma_4t4i, mod_1t1i)

`parse(name)` reads a name into a `Variant`; `apply(variant, model)` writes it into a
model config (model.ffn, model.experts, model.mod.enabled). Each experiment file decides
which of these names it offers and sets everything else (sizes, depth, schedule).
Only the standard library and ml_collections are needed here, so tools that only read
configs (moma-flops) stay free of JAX.
"""
from __future__ import annotations

import dataclasses
import re

import ml_collections

GRAMMAR = '[mod_]{dense|moe_<E>x|moma_<n>t<m>i|<n>t<m>i}'

_NAME = re.compile(r'(?P<mod>mod_)?(?:(?P<dense>dense)|moe_(?P<experts>\d+)x'
                   r'|(?:moma_)?(?P<text>\d+)t(?P<image>\d+)i)')


@dataclasses.dataclass(frozen=True)
class Variant:
  """A parsed variant name.

  Attributes:
    mod: whether the model is a mixture-of-depths one (model.mod.enabled).
    ffn: 'dense', 'moe' or 'moma' (model.ffn).
    experts: model.experts: () for dense, (E,) for moe, (n_text, n_image) for moma.
  """
  mod: bool
  ffn: str
  experts: tuple[int, ...]

  @property
  def name(self) -> str:
    """The variant's canonical name: 'moma_4t4i' for both '4t4i' and 'moma_4t4i'."""
    if self.ffn == 'dense':
      body = 'dense'
    elif self.ffn == 'moe':
      body = f'moe_{self.experts[0]}x'
    else:
      body = f'moma_{self.experts[0]}t{self.experts[1]}i'
    return f'mod_{body}' if self.mod else body


def parse(name: str) -> Variant:
  """The variant that `name` spells; ValueError naming the grammar if it spells none."""
  match = _NAME.fullmatch(name) if isinstance(name, str) else None
  if match is None:
    raise ValueError(f'unknown variant {name!r}: expected {GRAMMAR}, e.g. dense, moe_8x, '
                     'moma_4t4i, 4t4i, mod_moma_1t1i')
  mod = match['mod'] is not None
  if match['dense'] is not None:
    return Variant(mod=mod, ffn='dense', experts=())
  if match['experts'] is not None:
    ffn, experts = 'moe', (int(match['experts']),)
  else:
    ffn, experts = 'moma', (int(match['text']), int(match['image']))
  if min(experts) < 1:
    raise ValueError(f'variant {name!r}: expert counts must be at least 1 '
                     f'(grammar {GRAMMAR})')
  return Variant(mod=mod, ffn=ffn, experts=experts)


def apply(variant: Variant, model: ml_collections.ConfigDict) -> None:
  """Sets model.ffn, model.experts and model.mod.enabled of the model config `model`.

  A dense variant leaves model.experts as it is: the dense FFN never reads it, and the
  experiment files' dense configs have always carried the default there.
  """
  if variant.ffn == 'moma' and len(model.modalities) != 2:
    # '<n>t<m>i' names exactly two expert groups, a text one and an image one.
    raise ValueError(f'{variant.name} needs modalities (text, image), '
                     f'got {tuple(model.modalities)!r}')
  model.ffn = variant.ffn
  if variant.experts:
    model.experts = variant.experts
  model.mod.enabled = variant.mod
