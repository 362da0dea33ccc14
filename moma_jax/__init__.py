"""moma_jax: Mixture of Modality-Aware Experts for early-fusion mixed-modal language models.

Entry points: `moma_jax.configs` (config schema), `moma_jax.model.transformer` (the
decoder and its loss), `moma_jax.analysis.flops` (FLOPs and parameter accounting),
`moma_jax.load(workdir)` (a trained run's config, model and parameters).
"""
__version__ = '0.1.0'


def load(workdir: str, step: int | None = None, causal_thresholds: str = 'half',
         mesh=None):
  """A training run read back: `.config`, `.model`, `.params`, `.step`, `.mesh`
  (moma_jax.inference.saved_run). causal_thresholds: the auxiliary routers' decision
  rule in causal mode, 'half' (p > 0.5, the paper's) or 'calibrated' (compute-matched,
  as `moma-aux` calibrated them). mesh: a `jax.sharding.Mesh` with the axes of
  moma_jax.model.sharding, to read the parameters sharded by the training rules (None:
  onto one device); the optimizer state is never read."""
  from moma_jax.inference import saved_run   # pylint: disable=import-outside-toplevel
  return saved_run.load(workdir, step, causal_thresholds=causal_thresholds, mesh=mesh)
