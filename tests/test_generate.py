"""Sampling (moma_jax/inference/generate.py, moma-generate): nucleus sampling, the grammar, the KV
cache against the full causal pass, and the command's output and errors."""
import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import moma_jax
from moma_jax.cli import generate as generate_cli
from moma_jax.data import pipeline
from moma_jax.data import preview
from moma_jax.data import vocab as vocab_lib
from moma_jax.inference import generate


# One test process builds the shared aux_run fixture for both files (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('aux_run')


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
  logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1, 0.0]] * 2000))
  allowed = jnp.ones((2000, 4), bool)
  draw = lambda p, a=allowed: np.asarray(generate.nucleus_sample(
      jax.random.key(0), logits, a, temperature=1.0, top_p=p))
  assert set(draw(0.5).tolist()) == {0}                   # 0.6 alone reaches 0.5
  two = draw(0.7)                                         # 0.6 + 0.3 reach 0.7
  assert set(two.tolist()) == {0, 1}
  assert abs((two == 0).mean() - 2 / 3) < 0.05            # renormalized 0.6 : 0.3
  # The grammar's mask wins over the probabilities; temperature 0 is the masked argmax.
  only_2 = allowed.at[:, :2].set(False)
  assert set(draw(1.0, only_2).tolist()) == {2}
  greedy = generate.nucleus_sample(jax.random.key(0), logits, only_2, 0.0, 1.0)
  assert set(np.asarray(greedy).tolist()) == {2}


@pytest.fixture(scope='module')
def generator(aux_run):
  run = moma_jax.load(aux_run[1])
  return generate.Generator(run, pipeline.load_tokenizers(run.config))


@pytest.fixture(scope='module')
def calibrated_generator(aux_run, generator):
  run = moma_jax.load(aux_run[1], causal_thresholds='calibrated')
  return generate.Generator(run, generator.tok)


@pytest.mark.parametrize('thresholds', ['half', 'calibrated'])
def test_kv_cache_samples_are_the_full_causal_pass_argmax(thresholds, request):
  """Greedy captions of two images and a text continuation, in one left-padded batch:
  every new token is the argmax (among the tokens the grammar allows) of the full causal
  forward pass over the sampled sequence, at either routers' thresholds."""
  gen = request.getfixturevalue('generator' if thresholds == 'half'
                                else 'calibrated_generator')
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, gen.tok.image_shape, dtype=np.uint8)
  prompts = [gen.image_prompt(image), gen.text_prompt('a small red'), gen.text_prompt('a')]
  samples = gen.sample(prompts, max_new_tokens=12, temperature=0.0)
  full_pass = jax.jit(gen.run.model.in_mode(causal=True).apply)
  checked = 0
  for s in samples:
    ids = s.tokens
    n = len(ids)
    logits = full_pass({'params': gen.run.params}, jnp.asarray(ids)[None],
                       jnp.asarray(gen.vocab.modality_of(ids))[None],
                       jnp.ones((1, n), jnp.int32), jnp.arange(n, dtype=jnp.int32)[None])
    for i in range(s.prompt_len, n):
      allowed = gen._allowed([list(ids[:i])], text_only=False)[0]
      want = int(np.argmax(np.where(allowed, np.asarray(logits[0, i - 1]), -np.inf)))
      assert ids[i] == want, (i, ids[i], want)
      checked += 1
  assert checked >= 3 * 5


def test_text_to_image_follows_the_grammar(generator):
  gen = generator
  n = gen.codes_per_image
  samples = gen.sample([gen.text_prompt('a large blue square', open_image=True)] * 2,
                       max_new_tokens=n + 1, stop_after_image=True, seed=3)
  for s in samples:
    new = s.new_tokens
    assert s.finished and len(new) == n + 1 and new[-1] == vocab_lib.EOI
    assert np.all(gen.vocab.modality_of(new[:n]) == 1)
    (image,) = gen.images_of(s)
    assert image.shape == gen.tok.image_shape and image.dtype == np.uint8


def test_moma_generate_writes_the_image_grid(aux_run, tmp_path, capsys):
  out = tmp_path / 'grid.png'
  generate_cli.run(['moma-generate', '--workdir', aux_run[1], '--task', 'text_to_image',
                    '--prompt', 'a red circle', '--prompt', 'two green bars',
                    '--num_samples', '2', f'--image-out={out}',
                    '--causal_thresholds=calibrated'])
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '2 x 2 images' in capsys.readouterr().out


@pytest.mark.parametrize('case, message', [
    ('no_aux', 'moma-aux --workdir'),
    ('t2i_without_out', 'needs --image-out'),
    ('bad_out', 'must name a .png file'),
    ('bad_image', 'cannot read'),
    ('too_long', "exceed the model's max_len"),
])
def test_bad_input_exits_2_with_one_line(case, message, aux_run, trained_run, tmp_path,
                                         capsys):
  run = aux_run[1]
  args = {
      'no_aux': ['--workdir', trained_run[1], '--prompt', 'a'],
      't2i_without_out': ['--workdir', run, '--task', 'text_to_image', '--prompt', 'a'],
      'bad_out': ['--workdir', run, '--prompt', 'a', f'--image-out={tmp_path}/x.jpg'],
      'bad_image': ['--workdir', run, '--task', 'caption', '--image', str(tmp_path / 'no.png')],
      'too_long': ['--workdir', run, '--prompt', 'a', '--max_new_tokens', '1000'],
  }[case]
  before = sorted(os.listdir(run))
  with pytest.raises(SystemExit) as exit_info:
    generate_cli.run(['moma-generate', *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert sorted(os.listdir(run)) == before


class MultibyteCaptions(tfds.core.GeneratorBasedBuilder):
  """A user's captioned images whose captions are mostly two- and three-byte UTF-8."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'caption': tfds.features.Text(),
        'image': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(40, 0),
            'validation': self._generate_examples(8, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    words = ['Grüße', 'naïve', '日本語の', '文字', '✓', 'ça', 'Ωμέγα', '€']
    for i in range(count):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield i, {'caption': ' '.join(rng.choice(words, rng.choice([4, 40]))), 'image': image}


def test_text_cut_inside_a_character_previews_and_generates(generator, data_setup, tmp_path):
  """A packed row ends wherever the packing cuts a document, so inside a multi-byte
  character too: preview and generation show U+FFFD there, and never crash."""
  config, tok = data_setup
  MultibyteCaptions(data_dir=config.data.data_dir, file_format='array_record'
                    ).download_and_prepare()
  config = copy.deepcopy(config)
  config.data.name = 'multibyte_captions'
  batch = next(pipeline.train_iterator(config, tok))
  text_start = tok.vocab.start('text')

  def trailing_text(row) -> bytes:        # the bytes of the text run that ends the row
    run = []
    for t in row[::-1]:
      if not text_start <= t < text_start + 256:
        break
      run.append(int(t) - text_start)
    return bytes(run[::-1])

  def cut_inside_a_character(data: bytes) -> bool:
    try:
      data.decode('utf-8')
      return False
    except UnicodeDecodeError:
      return True

  cut = [row for row in batch['tokens'] if cut_inside_a_character(trailing_text(row))]
  assert cut, 'no row of the batch ends inside a character'
  for row in cut:
    kind, text = preview.parse_segment(tok, row)[-1]
    assert kind == 'text' and text.endswith('\ufffd'), text[-8:]
    assert generator.text_of(row).endswith('\ufffd')
  out = tmp_path / 'preview.png'
  assert preview.render_batch(tok, batch, str(out)) > 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # A prompt in the same text, continued by the tiny model (any bytes it likes).
  prompt = generator.text_prompt('Grüße 日本語の ✓')
  (sample,) = generator.sample([prompt], max_new_tokens=6, text_only=True, seed=1)
  assert generator.text_of(sample.tokens).startswith('Grüße 日本語の ✓')
