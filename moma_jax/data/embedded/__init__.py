"""Datasets built locally from data that ships with installed packages (no download).

  moma_digits   scikit-learn's handwritten digits, 32x32 RGB, captioned   (digits.py)
  moma_shapes   procedurally drawn shape scenes, captioned, any size      (shapes.py)
  moma_pydoc    documents from CPython's bundled reference topics        (pydoc_text.py)
Each is a TFDS `GeneratorBasedBuilder` written as array_record; `moma_jax.data.datasets`
builds them on first use and reads them back.
"""
from moma_jax.data.embedded.digits import MomaDigits
from moma_jax.data.embedded.pydoc_text import MomaPydoc
from moma_jax.data.embedded.shapes import MomaShapes

__all__ = ['MomaDigits', 'MomaPydoc', 'MomaShapes']
