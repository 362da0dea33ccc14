"""moma-data: build the datasets of an experiment, or preview its batches.

  moma-data build   --config experiments/FILE.py[:ARG] [--config.data.data_dir=DIR]
  moma-data preview --config experiments/FILE.py[:ARG] --out preview.png

`build` prepares every dataset the config names (TFDS, array_record) and fits the VQ
image tokenizer, caching both in `data.data_dir`, and prints what it built and how long
each part took. `preview` draws the documents of the first training batch: decoded
images beside the text around them.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

from moma_jax import configs
from moma_jax.cli import command as cli
from moma_jax.data import checks as data_checks
from moma_jax.data import datasets
from moma_jax.data import pipeline
from moma_jax.data import preview

ACTIONS = ('build', 'preview')
cli.define_config_flag()
OUT = cli.define_once(flags.DEFINE_string, 'out', None, 'preview: the PNG file to write')
USER_ERRORS = (*pipeline.DATA_ERRORS, OSError)


def build(config) -> None:
  root = pipeline.data_dir(config)
  print(f'data directory: {root}')
  options = configs.dataset_options(config.data)
  for name, _ in configs.mixture(config.data):
    start = time.perf_counter()
    sizes = {split: len(datasets.data_source(name, root, split, **options.get(name, {})))
             for split in ('train', config.data.eval_split)}
    sizes_text = ', '.join(f'{split} {n}' for split, n in sizes.items())
    print(f'  {name:<14} {sizes_text:<32} {time.perf_counter() - start:6.1f} s')
  start = time.perf_counter()
  tok = pipeline.load_tokenizers(config)
  print(f'  {"tokenizers":<14} vocabulary {tok.vocab.size} ids (text {tok.text.vocab_size}, '
        f'image {tok.image.vocab_size}) {time.perf_counter() - start:6.1f} s')
  start = time.perf_counter()
  data_checks.check(config, tok)
  print(f'  {"checked":<14} {"shards, record counts, sample documents":<32} '
        f'{time.perf_counter() - start:6.1f} s')


def show(config) -> None:
  if not OUT.value:
    raise cli.UsageError('preview needs --out FILE.png')
  out_dir = os.path.dirname(os.path.abspath(OUT.value))
  if not os.path.isdir(out_dir):
    raise cli.UsageError(f'--out: no such directory {out_dir!r}')
  tok = pipeline.load_tokenizers(config)
  batch = next(pipeline.train_iterator(config, tok))
  drawn = preview.render_batch(tok, batch, OUT.value, title=cli.config_argument())
  print(f'wrote {OUT.value}: {drawn} documents with images from a batch of '
        f'{batch["tokens"].shape[0]} x {batch["tokens"].shape[1]} tokens')


def run(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  prog = 'moma-data'
  if len(argv) < 2 or argv[1] not in ACTIONS:
    if len(argv) >= 2 and argv[1] in ('-h', '--help'):
      print(__doc__.strip())
      sys.exit(0)
    cli.fail(prog, f'the first argument must be one of {", ".join(ACTIONS)}')
  action = argv.pop(1)
  cli.run_main(build if action == 'build' else show, argv, prog=prog, usage=__doc__,
               user_errors=USER_ERRORS)


if __name__ == '__main__':
  run()
