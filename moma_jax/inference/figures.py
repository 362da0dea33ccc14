"""Figures of generated samples: image grids with their captions (matplotlib, PNG)."""
from __future__ import annotations

import textwrap
from typing import Sequence

from matplotlib.figure import Figure
import numpy as np

from moma_jax import run_dir


def _save(fig, path: str) -> None:
  """Writes the figure next to `path`, then renames: a reader never sees half a PNG."""
  with run_dir.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png', dpi=120)


def image_grid(rows: Sequence[Sequence[np.ndarray | None]], labels: Sequence[str],
               path: str) -> None:
  """One row of images (uint8 [H, W, 3]; None: no image was produced) per label."""
  cols = max(len(r) for r in rows)
  # A bare Figure (no pyplot): drawing files never changes a notebook's backend.
  fig = Figure(figsize=(1.6 * cols + 2.6, 1.7 * len(rows)))
  axes = fig.subplots(len(rows), cols, squeeze=False)
  for i, (row, label) in enumerate(zip(rows, labels)):
    for j in range(cols):
      ax = axes[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      image = row[j] if j < len(row) else None
      if image is None:
        ax.text(0.5, 0.5, 'none', ha='center', va='center', fontsize=8, color='grey')
      else:
        ax.imshow(image, interpolation='nearest')
    axes[i, 0].set_ylabel('\n'.join(textwrap.wrap(label, 22)), rotation=0, ha='right',
                          va='center', fontsize=8)
  fig.tight_layout()
  _save(fig, path)


def captioned_images(images: Sequence[np.ndarray], captions: Sequence[str],
                     truth: Sequence[str | None], path: str) -> None:
  """Each image with its generated caption (and the true one, where known)."""
  cols = min(4, len(images))
  n_rows = -(-len(images) // cols)
  fig = Figure(figsize=(3.0 * cols, 3.6 * n_rows))
  axes = fig.subplots(n_rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for k, (image, caption, true) in enumerate(zip(images, captions, truth)):
    ax = axes.flat[k]
    ax.imshow(image, interpolation='nearest')
    text = 'gen: ' + '\n'.join(textwrap.wrap(caption, 36)[:2])
    if true:
      text += '\ntrue: ' + '\n'.join(textwrap.wrap(true, 36)[:2])
    ax.set_title(text, fontsize=7, loc='left')
  fig.tight_layout()
  _save(fig, path)
