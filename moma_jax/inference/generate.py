"""Sampling mixed-modal continuations with a KV cache, in causal mode.

    gen = Generator(moma_jax.load(workdir), tokenizers)
    out = gen.sample([prompt_ids, ...], max_new_tokens=80, temperature=1.0, top_p=0.9,
                     seed=0)

The model decodes token by token (`Decoder.in_mode(causal=True, decode=True)`): expert choice and
mixture-of-depths are replaced by the auxiliary routers' decisions, so a routed model
needs them (`moma-aux`, or joint training). Prompts of different lengths are padded on
the left with segment 0, which attention never looks at, so all rows fill the cache in
step. A small grammar keeps samples well formed: inside an image (after <boi>) only
image codes are allowed, exactly one image's worth, then <eoi>; in text, text tokens,
<boi> and <eos>; a row that produced <eos> is finished.

The run's parameters may be sharded (`moma_jax.load(workdir, mesh=mesh)`): sampling then
runs under `run.mesh` and its logical-axis rules, the rows of the prompts and the cache
split over the batch axes where they divide them (else whole on every device), and
every process draws the same tokens.

Axis legend: B prompts (rows), P prompt length (padded), V vocabulary, S cache slots.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from moma_jax import configs
from moma_jax.data import documents as docs_lib
from moma_jax.data import vocab as vocab_lib
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import sharding


class GenerationError(ValueError):
  """A prompt or a run that cannot be sampled from; reported as one line."""


@dataclasses.dataclass
class Sample:
  """One row's result: all its tokens (prompt included) and what was generated."""
  tokens: np.ndarray            # [P + n] int32 vocabulary ids, no padding
  prompt_len: int
  finished: bool                # ended with <eos> (or <eoi> under stop_after_image)

  @property
  def new_tokens(self) -> np.ndarray:
    return self.tokens[self.prompt_len:]


def nucleus_sample(rng: jax.Array, logits: jax.Array, allowed: jax.Array,
                   temperature: float, top_p: float) -> jax.Array:
  """One token per row: logits [B, V] float32, allowed [B, V] bool -> ids [B] int32.

  temperature 0 is greedy; else softmax(logits / temperature) restricted to the
  smallest set of most likely tokens whose probability reaches top_p.
  """
  logits = jnp.where(allowed, logits, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  probs = jax.nn.softmax(logits / temperature, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, -1)
  # Keep a token if the mass before it is below top_p (the top token always stays).
  keep_sorted = (jnp.cumsum(sorted_p, -1) - sorted_p) < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(
      keep_sorted)
  return jax.random.categorical(rng, jnp.where(keep, jnp.log(probs), -jnp.inf)).astype(
      jnp.int32)


def _draw(seed, i, logits, allowed, temperature: float, top_p: float) -> jax.Array:
  """`nucleus_sample` with the key of draw i of `seed`, made inside the program (so
  that no process-local key array enters a computation over several processes)."""
  return nucleus_sample(jax.random.fold_in(jax.random.key(seed), i), logits, allowed,
                        temperature, top_p)


def decode_step(model):
  """(params, cache, tokens, modality, segment_ids, positions [B, T]) -> (logits [B, V]
  of each row's last position, updated cache), jit'd; `model` in decode mode. T is the
  prompt (prefill) or 1 (one new token per row)."""
  def step(params, cache, tokens, modality, segment_ids, positions):
    logits, updated = model.apply({'params': params, 'cache': cache}, tokens, modality,
                                  segment_ids, positions, mutable=['cache'])
    return logits[:, -1], updated['cache']
  return jax.jit(step)


def cache_shapes(model, batch_size: int):
  """The KV cache of `batch_size` rows as ShapeDtypeStructs (every layer's [B, S, H, K]
  keys and values, S = model.max_len slots), from abstract inputs only. The init key is
  made inside the traced function: a concrete key would live on this machine's default
  device, which an ahead-of-time compile for other devices cannot take."""
  row = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32)
  mod = jax.ShapeDtypeStruct((batch_size, 1), jnp.int8)
  return jax.eval_shape(lambda t, m, s, p: model.init(jax.random.key(0), t, m, s, p)['cache'],
                        row, mod, row, row)


class Generator:
  """Sampling from a loaded run (`moma_jax.load`) with the data's tokenizers."""

  def __init__(self, run, tok: docs_lib.Tokenizers):
    config = run.config
    if configs.looks_ahead(config.model) and not run.model.mode.aux_routers:
      raise GenerationError(f'{run.workdir}: a {config.model.ffn} model'
                            f'{" with mixture-of-depths" if config.model.mod.enabled else ""}'
                            ' decodes through auxiliary routers; train them first: '
                            f'moma-aux --workdir {run.workdir}')
    self.run, self.tok, self.config = run, tok, config
    self.vocab = tok.vocab
    self.max_len = config.model.max_len
    self.codes_per_image = tok.image.codes_per_image
    self.model = run.model.in_mode(causal=True, decode=True)
    self.mesh = run.mesh
    self._step = functools.partial(decode_step(self.model), run.params)
    # The drawn ids [B] whole on every device: each process reads them all.
    self._sample = jax.jit(_draw, static_argnames=('temperature', 'top_p'),
                           out_shardings=NamedSharding(self.mesh, P()))
    v = self.vocab
    self._text_ids = np.arange(v.start('text'), v.start('text') + v.sizes[0])
    self._image_ids = np.arange(v.start('image'), v.start('image') + v.sizes[1])

  # ------------------------------------------------------------------ prompts
  def text_prompt(self, text: str, open_image: bool = False) -> np.ndarray:
    """<bos> text [<boi>]: a caption to continue, or to draw when `open_image`."""
    ids = self.vocab.to_global(self.tok.text.encode(text), 'text')
    tail = [vocab_lib.BOI] if open_image else []
    return np.concatenate([[vocab_lib.BOS], ids, tail]).astype(np.int32)

  def image_prompt(self, image: np.ndarray) -> np.ndarray:
    """<bos> <boi> codes <eoi>: an image (uint8 [H, W, 3]) to caption."""
    codes = self.vocab.to_global(self.tok.image.encode(np.asarray(image)), 'image')
    return np.concatenate([[vocab_lib.BOS, vocab_lib.BOI], codes,
                           [vocab_lib.EOI]]).astype(np.int32)

  # ------------------------------------------------------------------ sampling
  def _allowed(self, history: list[list[int]], text_only: bool) -> np.ndarray:
    """[B, V] bool: the tokens the grammar allows next for each row."""
    allowed = np.zeros((len(history), self.config.model.vocab_size), bool)
    for r, ids in enumerate(history):
      boi = max((i for i, t in enumerate(ids) if t == vocab_lib.BOI), default=-1)
      eoi = max((i for i, t in enumerate(ids) if t == vocab_lib.EOI), default=-1)
      if boi > eoi:                                     # inside an image
        if len(ids) - boi - 1 < self.codes_per_image:
          allowed[r, self._image_ids] = True
        else:
          allowed[r, vocab_lib.EOI] = True
      else:
        allowed[r, self._text_ids] = True
        allowed[r, vocab_lib.EOS] = True
        allowed[r, vocab_lib.BOI] = not text_only
    return allowed

  def sample(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             text_only: bool = False, stop_after_image: bool = False) -> list[Sample]:
    """Continues every prompt (vocabulary ids) by up to `max_new_tokens` tokens.

    text_only: never open an image (captioning). stop_after_image: a row is finished
    once it closes an image (text-to-image).
    """
    if not prompts:
      raise GenerationError('no prompt to continue')
    if temperature < 0 or not 0 < top_p <= 1:
      raise GenerationError(f'need temperature >= 0 and 0 < top_p <= 1, got {temperature}, '
                            f'{top_p}')
    lens = [len(p) for p in prompts]
    width = max(lens)
    if width + max_new_tokens > self.max_len:
      raise GenerationError(f'prompt ({width} tokens) + {max_new_tokens} new tokens exceed '
                            f'the model\'s max_len {self.max_len}')
    with jax.set_mesh(self.mesh), sharding.axis_rules():
      return self._sample_on_mesh(prompts, max_new_tokens, temperature, top_p, seed,
                                  text_only, stop_after_image)

  def _rows(self, b: int) -> NamedSharding:
    """Where [B, ...] inputs and the cache live: rows over the batch axes when they
    divide B, else whole on every device."""
    split = b % mesh_lib.batch_shards(self.mesh) == 0
    return NamedSharding(self.mesh, P(mesh_lib.batch_axes(self.mesh) if split
                                      else None))

  def _sample_on_mesh(self, prompts, max_new_tokens, temperature, top_p, seed, text_only,
                      stop_after_image) -> list[Sample]:
    """`sample` after its checks, under the run's mesh."""
    lens = [len(p) for p in prompts]
    width = max(lens)
    b = len(prompts)
    rows = self._rows(b)
    put = lambda x: jax.device_put(np.asarray(x), rows)
    tokens = np.zeros((b, width), np.int32)
    segment = np.zeros((b, width), np.int32)
    positions = np.zeros((b, width), np.int32)
    for r, p in enumerate(prompts):
      tokens[r, width - len(p):] = p
      segment[r, width - len(p):] = 1
      positions[r, width - len(p):] = np.arange(len(p))
    with sharding.outside_mesh():         # the cache's shapes do not depend on the mesh
      shapes = cache_shapes(self.model, b)
    cache = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    out_shardings=jax.tree.map(lambda s: rows if s.ndim else NamedSharding(
                        self.mesh, P()), shapes))()
    logits, cache = self._step(cache, put(tokens), put(self.vocab.modality_of(tokens)),
                               put(segment), put(positions))
    history = [list(p) for p in prompts]
    done = [False] * b
    finished = [False] * b
    next_pos = np.asarray(lens, np.int32)
    for i in range(max_new_tokens):
      allowed = self._allowed(history, text_only)
      new = np.asarray(self._sample(np.int32(seed), np.int32(i), logits, allowed,
                                    temperature=float(temperature), top_p=float(top_p)))
      for r in range(b):
        if done[r]:
          continue
        history[r].append(int(new[r]))
        if new[r] == vocab_lib.EOS or (stop_after_image and new[r] == vocab_lib.EOI):
          done[r] = finished[r] = True
      if all(done) or i == max_new_tokens - 1:
        break
      # Finished rows go on in step with segment 0: nothing attends to them.
      live = np.asarray([0 if d else 1 for d in done], np.int32)
      step_tokens = new[:, None].astype(np.int32)
      logits, cache = self._step(cache, put(step_tokens),
                                 put(self.vocab.modality_of(step_tokens)),
                                 put(live[:, None]), put(next_pos[:, None]))
      next_pos = next_pos + 1
    return [Sample(np.asarray(h, np.int32), n, f) for h, n, f in zip(history, lens, finished)]

  # ------------------------------------------------------------------ reading samples
  def images_of(self, sample: Sample) -> list[np.ndarray]:
    """The complete images (uint8 [H, W, 3]) among a sample's new tokens."""
    out, ids, n = [], sample.tokens, self.codes_per_image
    # An image opened by the prompt's last token (text-to-image) counts as generated.
    for i in range(max(0, sample.prompt_len - 1), len(ids) - n):
      codes = ids[i + 1:i + 1 + n]
      if ids[i] == vocab_lib.BOI and np.all(self.vocab.modality_of(codes) == 1) and np.all(
          codes >= len(vocab_lib.SPECIALS)):
        out.append(self.tok.image.decode(self.vocab.to_local(codes, 'image')))
    return out

  def text_of(self, ids: np.ndarray) -> str:
    """Text tokens as a string; an image shows as [image], specials are dropped."""
    pieces, run, in_image = [], [], False
    for t in np.asarray(ids).tolist():
      if t == vocab_lib.BOI:
        in_image = True
        pieces.append(self.tok.text.decode(self.vocab.to_local(run, 'text')))
        pieces.append('[image]')
        run = []
      elif t == vocab_lib.EOI:
        in_image = False
      elif not in_image and t >= len(vocab_lib.SPECIALS):
        run.append(t)
    pieces.append(self.tok.text.decode(self.vocab.to_local(run, 'text')))
    return ''.join(pieces)
