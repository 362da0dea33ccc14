"""moma-generate: sample from a trained run in causal mode, with a KV cache.

Usage:
  moma-generate --workdir RUN --prompt TEXT [--prompt TEXT ...] [--image-out FILE.png]
  moma-generate --workdir RUN --task text_to_image --prompt CAPTION ... --image-out F.png
  moma-generate --workdir RUN --task caption --validation_images 8 [--image-out F.png]
  moma-generate --workdir RUN --task caption --image PICTURE.png ...
  moma-generate --workdir RUN --prompt TEXT --config.mesh.fsdp=8

Tasks:
  continue       (default) mixed-modal continuation of each text prompt: text, and
                 images wherever the model opens one; images go to --image-out.
  text_to_image  --num_samples images per caption, drawn through the image tokenizer's
                 decoder into a grid (one row per caption) in --image-out.
  caption        a caption for each image (--image files at the tokenizer's size, or
                 the first --validation_images images of the run's image datasets,
                 printed beside their true captions); --image-out shows them together.
Sampling: --temperature (0: greedy), --top_p, --seed, --max_new_tokens,
--causal_thresholds. `--config.mesh.data/fsdp/expert/tensor=N` (the others 1; -1: the
devices left over) opens the run sharded over the devices of every process by the
training rules, for a run larger than one device; without them it runs on one device.
A model with expert choice or mixture-of-depths decodes through its auxiliary routers
(`moma-aux --workdir RUN` first), at threshold 0.5 unless --causal_thresholds=calibrated
(the compute-matched thresholds moma-aux calibrated). Reads RUN, writes only --image-out.
"""
from __future__ import annotations

import os
import sys

from absl import flags
import numpy as np

from moma_jax import configs
from moma_jax.cli import command as cli
from moma_jax.cli import distributed
from moma_jax.data import checks as data_checks
from moma_jax.data import datasets
from moma_jax.data import pipeline
from moma_jax.inference import figures as generate_figures
from moma_jax.inference import generate
from moma_jax.inference import saved_run
from moma_jax.runs import saved
from moma_jax.inference import thresholds
from moma_jax import run_dir

PROG = 'moma-generate'
TASKS = ('continue', 'text_to_image', 'caption')
WORKDIR = cli.define_once(flags.DEFINE_string, 'workdir', None,
                          'the run directory (moma-train --workdir)')
TASK = cli.define_once(lambda name, default, help_text: flags.DEFINE_enum(
    name, default, TASKS, help_text), 'task', 'continue', 'what to generate')
PROMPT = cli.define_once(flags.DEFINE_multi_string, 'prompt', [],
                         'a text prompt or caption (repeat for several)')
IMAGE = cli.define_once(flags.DEFINE_multi_string, 'image', [],
                        'caption: a PNG image file at the tokenizer\'s size (repeatable)')
VALIDATION_IMAGES = cli.define_once(flags.DEFINE_integer, 'validation_images', 0,
                                    'caption: this many validation images of the run\'s data')
IMAGE_OUT = cli.define_once(flags.DEFINE_string, 'image-out', None,
                            'PNG file for the images (text_to_image: required)')
NUM_SAMPLES = cli.define_once(flags.DEFINE_integer, 'num_samples', 4,
                              'text_to_image: images per caption')
TEMPERATURE = cli.define_once(flags.DEFINE_float, 'temperature', 1.0, '0: greedy')
TOP_P = cli.define_once(flags.DEFINE_float, 'top_p', 0.9, 'nucleus sampling mass')
SEED = cli.define_once(flags.DEFINE_integer, 'seed', 0, 'sampling seed')
THRESHOLDS = cli.define_once(lambda name, default, help_text: flags.DEFINE_enum(
    name, default, thresholds.CHOICES, help_text), 'causal_thresholds', thresholds.HALF,
    "the auxiliary routers' thresholds: half (p > 0.5, the paper's) or calibrated (the "
    'compute-matched ones moma-aux calibrated)')
MAX_NEW = cli.define_once(flags.DEFINE_integer, 'max_new_tokens', 96,
                          'tokens to generate at most per prompt')


def _check_out(path: str | None) -> str | None:
  if path is None:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  if not path.lower().endswith('.png'):
    raise cli.UsageError(f'--image-out must name a .png file, got {path}')
  if not os.path.isdir(os.path.dirname(path)):
    raise cli.UsageError(f'--image-out: no such directory {os.path.dirname(path)}')
  return path


def _read_image(path: str, shape) -> np.ndarray:
  import matplotlib.image
  try:
    image = matplotlib.image.imread(path)
  except (OSError, ValueError, SyntaxError) as e:
    raise cli.UsageError(f'--image: cannot read {path} ({e})') from e
  if image.dtype != np.uint8:
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  image = image[..., :3] if image.ndim == 3 else image
  if image.shape != tuple(shape):
    raise cli.UsageError(f'--image: {path} is {image.shape}, the image tokenizer takes '
                         f'{tuple(shape)}')
  return image


def _validation_images(config, count: int):
  """(images, true captions) of the first `count` validation examples of the run's
  image datasets."""
  names = [n for n, _ in configs.mixture(config.data) if datasets.KIND.get(n) == 'image_text']
  if not names:
    raise cli.UsageError('--validation_images: the run\'s data has no image dataset')
  src = datasets.data_source(names[0], pipeline.data_dir(config), config.data.eval_split,
                             **configs.dataset_options(config.data).get(names[0], {}))
  count = min(count, len(src))
  examples = [src[i] for i in range(count)]
  caption = lambda c: c.decode('utf-8') if isinstance(c, bytes) else str(c)
  return ([np.asarray(e['image']) for e in examples], [caption(e['caption'])
                                                       for e in examples])


def _write(draw, *args) -> None:
  """A figure to --image-out; an unwritable file is the user's to fix (exit 2)."""
  try:
    draw(*args)
  except OSError as e:
    raise cli.UsageError(f'--image-out: cannot write {args[-1]} ({e.strerror or e})') from e


def main(mesh_overrides: dict[str, int]) -> None:
  distributed.initialize()
  if not WORKDIR.value:
    raise cli.UsageError('--workdir DIR is required')
  if MAX_NEW.value < 1 or NUM_SAMPLES.value < 1:
    raise cli.UsageError('--max_new_tokens and --num_samples must be >= 1')
  out = _check_out(IMAGE_OUT.value)
  task = TASK.value
  if task in ('continue', 'text_to_image') and not PROMPT.value:
    raise cli.UsageError(f'--task {task} needs at least one --prompt')
  if task == 'text_to_image' and out is None:
    raise cli.UsageError('--task text_to_image needs --image-out FILE.png')
  if task == 'caption' and not (IMAGE.value or VALIDATION_IMAGES.value > 0):
    raise cli.UsageError('--task caption needs --image FILE.png or --validation_images N')
  config = saved.read_config(WORKDIR.value)
  tok = pipeline.load_tokenizers(config)
  if task == 'caption' and VALIDATION_IMAGES.value > 0:
    # The data first: a bad shard is the first thing to fix, before the model loads.
    data_checks.check(config, tok, (config.data.eval_split,))
  # Causal decoding routes token by token: the prompts need not hold routing groups.
  mesh = saved.mesh_for(WORKDIR.value, mesh_overrides, whole_groups=False)
  run = saved_run.load(WORKDIR.value, causal_thresholds=THRESHOLDS.value, mesh=mesh)
  gen = generate.Generator(run, tok)
  kw = dict(temperature=TEMPERATURE.value, top_p=TOP_P.value, seed=SEED.value)

  if task == 'text_to_image':
    prompts = [gen.text_prompt(p, open_image=True) for p in PROMPT.value
               for _ in range(NUM_SAMPLES.value)]
    samples = gen.sample(prompts, max_new_tokens=tok.image.codes_per_image + 1,
                         stop_after_image=True, **kw)
    images = [(gen.images_of(s) or [None])[0] for s in samples]
    rows = [images[i * NUM_SAMPLES.value:(i + 1) * NUM_SAMPLES.value]
            for i in range(len(PROMPT.value))]
    _write(generate_figures.image_grid, rows, PROMPT.value, out)
    print(f'{PROG}: {len(PROMPT.value)} x {NUM_SAMPLES.value} images -> {out}')
    return

  if task == 'caption':
    images = [_read_image(p, tok.image_shape) for p in IMAGE.value]
    truth = [None] * len(images)
    if VALIDATION_IMAGES.value > 0:
      more, captions = _validation_images(run.config, VALIDATION_IMAGES.value)
      images, truth = images + more, truth + captions
    samples = gen.sample([gen.image_prompt(im) for im in images],
                         max_new_tokens=MAX_NEW.value, text_only=True, **kw)
    captions = [gen.text_of(s.new_tokens) for s in samples]
    for i, (c, t) in enumerate(zip(captions, truth)):
      print(f'[{i}] generated: {c!r}' + (f'\n    true:      {t!r}' if t else ''))
    if out:
      _write(generate_figures.captioned_images, images, captions, truth, out)
      print(f'{PROG}: figure -> {out}')
    return

  samples = gen.sample([gen.text_prompt(p) for p in PROMPT.value],
                       max_new_tokens=MAX_NEW.value, **kw)
  images = []
  for p, s in zip(PROMPT.value, samples):
    print(f'{p!r} -> {gen.text_of(s.new_tokens)!r}'
          + ('' if s.finished else ' (stopped at --max_new_tokens)'))
    images += gen.images_of(s)
  if out and images:
    _write(generate_figures.image_grid, [images], ['images in the continuations'], out)
    print(f'{PROG}: {len(images)} image(s) -> {out}')
  elif out:
    print(f'{PROG}: the continuations hold no image; {out} not written', file=sys.stderr)


def run(argv: list[str] | None = None) -> None:
  """Console script entry point (`moma-generate`); argv[0] is the program name."""
  cli.run_main(main, argv, prog=PROG, usage=__doc__, with_config=False, with_mesh=True,
               user_errors=(*pipeline.DATA_ERRORS, run_dir.RunDirError,
                            generate.GenerationError))


if __name__ == '__main__':
  run(sys.argv)
