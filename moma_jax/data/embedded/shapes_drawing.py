"""Scenes of coloured shapes: a random scene spec, its 32x32 drawing and a caption.

A scene is a plain background with 1-3 shapes that never touch (their bounding boxes
keep a gap of at least one pixel), drawn without anti-aliasing in exact palette colours,
so that everything a caption claims can be read back from the pixels (`read_shapes`):
one connected component per shape, its colour, its bounding-box size and its outline.

Captions are compositional and only use relations that are clear in the picture:
  one shape     "a small red circle", "a large blue bar in the top left corner"
  identical     "three small green triangles", "two purple crosses on a black background"
  relation      "a small red circle above a large blue square",
                "a yellow square on the left and a purple circle on the right"
  ordered       "from left to right: a small red bar, a large blue cross and a small
                green circle"
  grouped       "two red circles and a blue square"
Everything is drawn from the `rng` passed in, so a seeded generator gives the same scene.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

IMAGE_SIZE = 32
COLORS = {'red': (220, 40, 40), 'green': (40, 170, 70), 'blue': (40, 90, 230),
          'yellow': (240, 210, 40), 'purple': (150, 60, 190), 'orange': (250, 140, 30)}
# Neutral backgrounds, far from every shape colour.
BACKGROUNDS = {'white': (250, 250, 250), 'grey': (160, 160, 160), 'black': (15, 15, 15)}
KINDS = ('circle', 'square', 'triangle', 'cross', 'bar')
SIZES = {'small': 8, 'large': 14}        # extent of the longer side in pixels
NUMBERS = {1: 'a', 2: 'two', 3: 'three'}
MIN_GAP = 4        # pixels between centres before "left of" / "above" is said


@dataclasses.dataclass(frozen=True)
class Shape:
  """One shape: its bounding box is rows [y, y + height), columns [x, x + width)."""
  kind: str
  color: str
  size: str
  x: int
  y: int

  @property
  def width(self) -> int:
    return SIZES[self.size]

  @property
  def height(self) -> int:
    return _thickness(self.width) if self.kind == 'bar' else self.width

  @property
  def center(self) -> tuple[float, float]:
    """(x, y) of the bounding box's centre in pixel coordinates."""
    return self.x + self.width / 2, self.y + self.height / 2


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  shapes: tuple[Shape, ...]


def _thickness(extent: int) -> int:
  # Even, so that crosses and bars are symmetric: 2 px for small, 4 px for large.
  return 2 * max(1, round(extent / 7))


@functools.lru_cache(maxsize=None)
def shape_mask(kind: str, extent: int) -> np.ndarray:
  """bool [h, w]: the shape's pixels inside its bounding box (read-only, cached)."""
  mask = _draw_mask(kind, extent)
  mask.flags.writeable = False
  return mask


def _draw_mask(kind: str, extent: int) -> np.ndarray:
  t = _thickness(extent)
  if kind == 'bar':
    return np.ones((t, extent), bool)
  c = (np.arange(extent) + 0.5) - extent / 2          # pixel centres around the middle
  v, u = np.meshgrid(c, c, indexing='ij')
  if kind == 'square':
    return np.ones((extent, extent), bool)
  if kind == 'circle':
    return u ** 2 + v ** 2 <= (extent / 2) ** 2
  if kind == 'triangle':                             # apex up, base along the bottom row
    half = (np.arange(extent)[:, None] + 1) / 2
    return np.abs(u) <= half
  if kind == 'cross':
    return (np.abs(u) <= t / 2) | (np.abs(v) <= t / 2)
  raise ValueError(f'unknown shape kind {kind!r}')


def render(scene: Scene) -> np.ndarray:
  """uint8 [32, 32, 3]: the background filled, then every shape in its colour."""
  image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  image[:] = BACKGROUNDS[scene.background]
  for s in scene.shapes:
    mask = shape_mask(s.kind, s.width)
    image[s.y:s.y + s.height, s.x:s.x + s.width][mask] = COLORS[s.color]
  return image


def _apart(a: Shape, b: Shape) -> bool:
  """Bounding boxes separated by at least one background pixel."""
  return (a.x + a.width < b.x or b.x + b.width < a.x or
          a.y + a.height < b.y or b.y + b.height < a.y)


def _place(rng: np.random.Generator, attrs: Sequence[tuple[str, str, str]]
           ) -> tuple[Shape, ...] | None:
  shapes = []
  for kind, color, size in attrs:
    for _ in range(50):
      # Never on the outermost pixels: the border shows the background.
      probe = Shape(kind, color, size, 0, 0)
      x = int(rng.integers(1, IMAGE_SIZE - probe.width))
      y = int(rng.integers(1, IMAGE_SIZE - probe.height))
      s = dataclasses.replace(probe, x=x, y=y)
      if all(_apart(s, o) for o in shapes):
        shapes.append(s)
        break
    else:
      return None
  return tuple(shapes)


def make_scene(rng: np.random.Generator) -> Scene:
  """A random scene of 1-3 shapes; a quarter of the multi-shape scenes are identical
  shapes (so that captions like "two green triangles" occur)."""
  def one():
    return (str(rng.choice(KINDS)), str(rng.choice(list(COLORS))),
            str(rng.choice(list(SIZES))))
  background = str(rng.choice(list(BACKGROUNDS)))
  while True:                      # until the shapes fit without touching
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    attrs = [one()] * n if n > 1 and rng.random() < 0.25 else [one() for _ in range(n)]
    shapes = _place(rng, attrs)
    if shapes is not None:
      return Scene(background, shapes)


def read_background(image: np.ndarray) -> str | None:
  """The most common colour of the image's border (shapes keep off the outermost
  pixels) if it is a background colour."""
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  colors, counts = np.unique(border, axis=0, return_counts=True)
  top = tuple(int(c) for c in colors[np.argmax(counts)])
  return next((name for name, rgb in BACKGROUNDS.items() if rgb == top), None)


def read_shapes(image: np.ndarray) -> list[Shape]:
  """The shapes in `image`, from its pixels alone: one per connected region of a palette
  colour, kind and size found by matching the region against every drawable outline
  (both None when none matches). Scores generated images against their captions."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top  # readers only
  found = []
  for color, rgb in COLORS.items():
    mask = np.all(image == rgb, axis=-1)
    if not mask.any():
      continue
    labels, _ = ndimage.label(mask)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
      region = labels[box] == k
      match = next(((kind, size) for size, extent in SIZES.items() for kind in KINDS
                    if np.array_equal(shape_mask(kind, extent), region)), (None, None))
      found.append(Shape(match[0], color, match[1], box[1].start, box[0].start))
  return found


# ----------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------
def phrase(count: int, color: str, kind: str, size: str | None = None) -> str:
  """'a small red circle', 'an orange bar', 'two large blue crosses'."""
  words = ' '.join(w for w in (size, color) if w)
  noun = kind if count == 1 else (kind + 'es' if kind.endswith('s') else kind + 's')
  number = NUMBERS[count]
  if count == 1 and words[0] in 'aeiou':
    number = 'an'
  return f'{number} {words} {noun}'


def region(x: float, y: float, margin: float = 1.5) -> str | None:
  """Where a point lies in a 3x3 grid ('in the top left corner', 'on the left', 'in the
  middle', ...), or None when it is within `margin` pixels of a grid line (unclear)."""
  def third(v, names):
    for k, name in enumerate(names):
      lo, hi = k * IMAGE_SIZE / 3, (k + 1) * IMAGE_SIZE / 3
      if lo + (margin if k else 0) <= v < hi - (margin if k < 2 else 0):
        return name
    return None
  row, col = third(y, ('top', 'middle', 'bottom')), third(x, ('left', 'middle', 'right'))
  if row is None or col is None:
    return None
  if row == col == 'middle':
    return 'in the middle'
  if row == 'middle':
    return f'on the {col}'
  if col == 'middle':
    return f'at the {row}'
  return f'in the {row} {col} corner'


def _ordered(shapes: Sequence[Shape], axis: int) -> list[Shape] | None:
  """Shapes sorted along x (axis 0) or y (axis 1) if consecutive centres are clearly
  apart on that axis and no further apart on the other one."""
  out = sorted(shapes, key=lambda s: s.center[axis])
  for a, b in zip(out, out[1:]):
    d = b.center[axis] - a.center[axis]
    if d < MIN_GAP or d < abs(b.center[1 - axis] - a.center[1 - axis]) + 1:
      return None
  return out


def _join(parts: Sequence[str]) -> str:
  return parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """An English description of `scene`, true of its drawing; wording drawn from rng."""
  shapes = scene.shapes
  bg = f' on a {scene.background} background' if rng.random() < 0.2 else ''
  first = shapes[0]
  if len(shapes) == 1:
    where = region(*first.center)
    size = None if rng.random() < 0.2 else first.size
    text = phrase(1, first.color, first.kind, size)
    if where and rng.random() < 0.5:
      return f'{text} {where}'
    return text + bg
  if len(set((s.kind, s.color, s.size) for s in shapes)) == 1:
    size = None if rng.random() < 0.3 else first.size
    return phrase(len(shapes), first.color, first.kind, size) + bg

  horizontal, vertical = _ordered(shapes, 0), _ordered(shapes, 1)
  ordered = horizontal or vertical
  if ordered and rng.random() < 0.7:
    p = [phrase(1, s.color, s.kind, s.size) for s in ordered]
    if len(shapes) == 2:
      if horizontal:
        options = [f'{p[0]} to the left of {p[1]}', f'{p[1]} to the right of {p[0]}',
                   f'{p[0]} on the left and {p[1]} on the right']
      else:
        options = [f'{p[0]} above {p[1]}', f'{p[1]} below {p[0]}']
      return str(rng.choice(options))
    order = 'from left to right' if horizontal else 'from top to bottom'
    if rng.random() < 0.5:
      return f'{order}: {_join(p)}'
    return f'{_join(p)}, {order}'

  with_size = rng.random() < 0.5
  groups: dict[tuple, int] = {}
  for s in shapes:
    key = (s.color, s.kind, s.size if with_size else None)
    groups[key] = groups.get(key, 0) + 1
  return _join([phrase(n, *key) for key, n in groups.items()]) + bg
