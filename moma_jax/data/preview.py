"""Reading token streams back as text and pictures, and a preview figure of a batch.

`parse_segment` turns one segment's vocabulary ids [T] into parts: ('text', str) and
('image', uint8 [H, W, 3]); `render_batch` draws a grid of a batch's documents, each
image beside the text around it, into a PNG.
"""
from __future__ import annotations

import textwrap
from typing import Mapping

import numpy as np

from moma_jax.data import documents as docs_lib
from moma_jax.data import vocab as vocab_lib


def parse_segment(tok: docs_lib.Tokenizers, tokens: np.ndarray) -> list[tuple[str, object]]:
  """Vocabulary ids of one segment -> [('text', str) | ('image', uint8 [H, W, 3])].

  A segment may start or end inside an image (a document continued from the previous
  row): such partial images are shown as the text '[partial image]'.
  """
  parts: list[tuple[str, object]] = []
  text: list[int] = []
  image: list[int] | None = None       # codes of the image being read
  image_start = tok.vocab.start('image')

  def flush_text():
    if text:
      parts.append(('text', tok.text.decode(tok.vocab.to_local(np.array(text), 'text'))))
      text.clear()

  def close_image(codes):
    if codes is not None and len(codes) == tok.image.codes_per_image and -1 not in codes:
      parts.append(('image', tok.image.decode(tok.vocab.to_local(np.array(codes), 'image'))))
    else:
      parts.append(('text', '[partial image]'))

  for t in np.asarray(tokens).tolist():
    if t == vocab_lib.BOI:
      flush_text()
      image = []
    elif t >= image_start:
      if image is None:          # the image began before this segment
        flush_text()
        image = [-1]
      image.append(t)
    elif t == vocab_lib.EOI:
      close_image(image)
      image = None
    elif t >= len(vocab_lib.SPECIALS):
      if image is not None:      # text inside an image: it was cut short
        close_image(None)
        image = None
      text.append(t)
  flush_text()
  if image is not None:
    close_image(None)
  return parts


def batch_documents(batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
  """Each non-padding segment of each row of a batch, as vocabulary ids [T]."""
  out = []
  for tokens, seg in zip(np.asarray(batch['tokens']), np.asarray(batch['segment_ids'])):
    for s in np.unique(seg[seg > 0]):
      out.append(tokens[seg == s])
  return out


def render_batch(tok: docs_lib.Tokenizers, batch: Mapping[str, np.ndarray], path: str,
                 max_docs: int = 12, title: str = '') -> int:
  """Draws up to `max_docs` documents that hold an image; returns how many were drawn."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  picked = []
  for ids in batch_documents(batch):
    parts = parse_segment(tok, ids)
    if any(kind == 'image' for kind, _ in parts):
      picked.append(parts)
    if len(picked) == max_docs:
      break
  cols = 3
  rows = max(1, -(-len(picked) // cols))
  fig, axes = plt.subplots(rows, cols * 2, figsize=(cols * 5.2, rows * 2.0),
                           gridspec_kw={'width_ratios': [1, 2.2] * cols}, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for k, parts in enumerate(picked):
    ax_img, ax_txt = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
    images = [p for kind, p in parts if kind == 'image']
    ax_img.imshow(np.concatenate(images, axis=1), interpolation='nearest')
    order = ' '.join('[image]' if kind == 'image' else str(p).strip() for kind, p in parts)
    ax_txt.text(0, 0.5, '\n'.join(textwrap.wrap(order, 38)[:7]), va='center', fontsize=8,
                family='monospace')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return len(picked)
