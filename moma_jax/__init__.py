"""moma_jax: Mixture of Modality-Aware Experts for early-fusion mixed-modal language models.

Entry points: `moma_jax.configs` (config schema), `moma_jax.model.transformer` (the
decoder and its loss), `moma_jax.flops` (FLOPs and parameter accounting).
"""
__version__ = '0.1.0'
