"""Embedded datasets and the registry: sizes, determinism, captions true to the pixels,
cache reuse, error messages, interrupted builds and a researcher's own TFDS dataset."""
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moma_jax.data import datasets
from moma_jax.data.embedded import digits
from moma_jax.data.embedded import pydoc_text
from moma_jax.data.embedded import shapes
from moma_jax.data.embedded import shapes_drawing as sd

SMALL = dict(num_train=200, num_validation=40)
TINY = dict(num_train=60, num_validation=10)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """One data directory with all three datasets (shapes at a small size)."""
  data_dir = str(tmp_path_factory.mktemp('data'))
  for name in datasets.EMBEDDED:
    datasets.prepare(name, data_dir, **_opts(name))
  return data_dir


def _opts(name):
  return SMALL if name == 'moma_shapes' else {}


def _source(data_dir, name, split):
  return datasets.data_source(name, data_dir, split, **_opts(name))


def _all(src):
  return [src[i] for i in range(len(src))]


def test_splits_sizes_and_types(built):
  pydoc_sizes = {k: len(v) for k, v in pydoc_text.examples().items()}
  expected = {'moma_digits': {'train': 1617, 'validation': 180},
              'moma_shapes': {'train': 200, 'validation': 40}, 'moma_pydoc': pydoc_sizes}
  for name, sizes in expected.items():
    for split, size in sizes.items():
      src = _source(built, name, split)
      assert len(src) == size > 0, (name, split)
      ex = src[size - 1]
      if datasets.KIND[name] == 'image_text':
        assert set(ex) == {'image', 'caption'} and isinstance(ex['caption'], bytes)
        assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
      else:
        assert set(ex) == {'text'} and isinstance(ex['text'], bytes)
  assert set(datasets.EMBEDDED) == set(datasets.KIND)
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(_source(built, 'moma_shapes', 'validation'))
  assert len([ex['caption'] for ex in ds.map(lambda ex: ex)]) == 40


def test_building_twice_gives_identical_datasets(built, tmp_path):
  def files(data_dir, name):
    path = datasets.prepare(name, data_dir, **_opts(name)).data_path
    return {p.name: p.read_bytes() for p in path.glob('*array_record*')}
  for name in datasets.EMBEDDED:
    again = str(tmp_path / name)
    for split in ('train', 'validation'):
      a, b = _all(_source(built, name, split)), _all(_source(again, name, split))
      assert len(a) == len(b) and all(
          x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
          for x, y in zip(a, b)), (name, split)
    assert files(built, name) == files(again, name)


# Shapes: every claim of a caption is read back from the pixels.
PHRASE = re.compile(r'\b(a|an|two|three) (?:(small|large) )?(%s) (%s)(?:es|s)?\b' % (
    '|'.join(sd.COLORS), '|'.join(sd.KINDS)))
ORDER = r'from (?:left to right|top to bottom)'
BG = r'(?: on a (?:white|grey|black) background)?'
SKELETONS = [re.compile(s) for s in (
    rf'X{BG}', r'X (?:in the middle|on the (?:left|right)|at the (?:top|bottom)|'
    r'in the (?:top|bottom) (?:left|right) corner)', r'X to the (?:left|right) of X',
    r'X on the left and X on the right', r'X (?:above|below) X',
    rf'(?:{ORDER}: )?X(?:, X)* and X(?:, {ORDER})?{BG}')]


def _matches(attrs, shape):                     # attrs: (size or None, color, kind)
  return (shape.color, shape.kind) == attrs[1:] and attrs[0] in (None, shape.size)


def check_caption(image, caption):
  """Asserts that `caption` is true of `image`; returns its wording skeleton."""
  bg, seen = sd.read_background(image), sd.read_shapes(image)
  assert bg and all(s.kind for s in seen)       # every region is a drawable shape
  assert set(map(tuple, image.reshape(-1, 3).tolist())) <= {sd.BACKGROUNDS[bg],
                                                            *sd.COLORS.values()}
  assert re.sub(r'.* on a (\w+) background$', r'\1', caption) in (caption, bg)
  count = {'a': 1, 'an': 1, 'two': 2, 'three': 3}
  phrases = [(count[n], (size or None, c, k)) for n, size, c, k in PHRASE.findall(caption)]
  for article, word in re.findall(r'\b(a|an) (\w+)', caption):
    assert (article == 'an') == (word[0] in 'aeiou'), caption
  skeleton = PHRASE.sub('X', caption)
  assert any(s.fullmatch(skeleton) for s in SKELETONS), caption
  assert sum(n for n, _ in phrases) == len(seen), caption
  order = re.search(r'from (left to right|top to bottom)', caption)
  pair = re.search(r'to the (left|right) of|on the left and|above|below', caption)
  if order or (pair and len(phrases) == 2):
    word = order.group(1) if order else pair.group(0)
    axis = 1 if word in ('top to bottom', 'above', 'below') else 0
    listed = [a for _, a in phrases]
    if word in ('to the right of', 'below'):
      listed = listed[::-1]
    by_axis = sorted(seen, key=lambda s: s.center[axis])
    assert all(_matches(a, s) for a, s in zip(listed, by_axis)), caption
    assert all(a.center[axis] < b.center[axis] for a, b in zip(by_axis, by_axis[1:]))
  else:                                         # counts per group are exact
    for n, attrs in phrases:
      assert sum(_matches(attrs, s) for s in seen) == n, caption
    where = re.search(r'(?:in|on|at) the (\w+ \w+ corner|middle|left|right|top|bottom)',
                      caption)
    if where and len(seen) == 1:                # {row, column} of the 3x3 grid
      x, y = seen[0].center
      at = {('top', 'middle', 'bottom')[int(y * 3 // 32)],
            ('left', 'middle', 'right')[int(x * 3 // 32)]}
      words = where.group(1).replace(' corner', '').split()
      assert at == set(words) | ({'middle'} if len(words) == 1 else set()), caption
  return skeleton


def test_shape_captions_are_true_of_the_pixels(built):
  pairs = [(ex['image'], ex['caption'].decode()) for split in ('train', 'validation')
           for ex in _all(_source(built, 'moma_shapes', split))]
  for scene, image, caption in (shapes.example(7, 'train', i) for i in range(1000)):
    assert sorted(sd.read_shapes(image), key=repr) == sorted(scene.shapes, key=repr)
    assert sd.read_background(image) == scene.background
    pairs.append((image, caption))
  skeletons = {check_caption(image, caption) for image, caption in pairs}
  assert len(skeletons) >= 8                    # the wording varies
  words = ' '.join(c for _, c in pairs)
  for word in (*sd.COLORS, *sd.KINDS, 'two', 'three', 'above', 'left', 'small', 'large'):
    assert word in words


def test_built_shapes_are_the_generated_examples(built):
  for split, count in (('train', 200), ('validation', 40)):
    made = [shapes.example(0, split, i)[1:] for i in range(count)]
    made = {image.tobytes(): caption for image, caption in made}
    got = {ex['image'].tobytes(): ex['caption'].decode()
           for ex in _all(_source(built, 'moma_shapes', split))}
    assert got == made
  assert [shapes.example(3, 'train', i)[2] for i in range(50)] != [
      shapes.example(4, 'train', i)[2] for i in range(50)]


DIGIT = re.compile(r'\b(%s|\d)\b' % '|'.join(digits.WORDS))


def test_digit_captions_name_the_label(built):
  made, label_of = digits.examples(), {}
  for rows in made.values():
    for _, image, caption, label in rows:
      named = {digits.WORDS.index(w) if w in digits.WORDS else int(w)
               for w in DIGIT.findall(caption)}
      assert named == {label}, caption
      assert image[0, 0].mean() > image.mean(-1).min() + 60    # dark ink, light paper
      label_of[image.tobytes()] = label
  assert {k for k, *_ in made['train']}.isdisjoint(k for k, *_ in made['validation'])
  for split in ('train', 'validation'):
    for ex in _all(_source(built, 'moma_digits', split)):
      label, words = label_of[ex['image'].tobytes()], DIGIT.findall(ex['caption'].decode())
      assert words and all(w in (str(label), digits.WORDS[label]) for w in words)
  assert len({c for rows in made.values() for _, _, c, _ in rows}) >= 50


def test_pydoc_documents_are_english_within_bounds(built):
  docs = {split: [ex['text'].decode() for ex in _all(_source(built, 'moma_pydoc', split))]
          for split in ('train', 'validation')}
  for split, texts in docs.items():
    assert len(texts) >= (20 if split == 'validation' else 200)
    for text in texts:
      assert pydoc_text.MIN_CHARS <= len(text) <= pydoc_text.MAX_CHARS
      # Trimmed, and no heading underlines ("*****").
      assert text == text.strip('\n').rstrip() and not re.search(r'^\*{5,}$', text, re.M)
    letters = [sum(c.isalpha() or c.isspace() for c in t) / len(t) for t in texts]
    assert min(letters) > 0.5 and np.median(letters) > 0.85   # prose, some code
    assert sum(' the ' in t for t in texts) > 0.8 * len(texts)
  topics = {s: {k.split('/')[0] for k, _ in rows} for s, rows in pydoc_text.examples().items()}
  assert topics['train'].isdisjoint(topics['validation'])


def test_pydoc_cutting_keeps_all_words_and_bounds():
  long_para = ' '.join(f'word{i}' for i in range(900))              # no sentence ends
  text = f'Title\n*****\n\nShort.\n\n{long_para}\n\nA. B. ' + 'Sentence here. ' * 200
  docs = pydoc_text.documents(text)
  assert all(pydoc_text.MIN_CHARS <= len(d) <= pydoc_text.MAX_CHARS for d in docs)
  assert ' '.join(docs).split() == [w for w in text.split() if w != '*****']


def test_second_prepare_reuses_the_cache(built, capsys):
  def mtimes():
    return {p: p.stat().st_mtime_ns for p in pathlib.Path(built).rglob('*') if p.is_file()}
  before, start = mtimes(), time.perf_counter()
  for name in datasets.EMBEDDED:
    datasets.prepare(name, built, **_opts(name))
  assert time.perf_counter() - start < 2.0 and mtimes() == before
  out = capsys.readouterr()
  assert 'building' not in out.err and not out.out


def test_errors_name_the_dataset_path_and_choices(built, tmp_path):
  with pytest.raises(datasets.DatasetError, match=r"'no_such_data'.*moma_digits, moma_pydoc"):
    datasets.prepare('no_such_data', str(tmp_path))
  (blocker := tmp_path / 'a_file').write_text('x')
  with pytest.raises(datasets.DatasetError, match=re.escape(str(blocker / 'data'))):
    datasets.prepare('moma_pydoc', str(blocker / 'data'))
  with pytest.raises(datasets.DatasetError, match="no split 'test'; splits: train, validation"):
    _source(built, 'moma_shapes', 'test')
  with pytest.raises(datasets.DatasetError, match='moma_shapes.*num_train, num_validation'):
    datasets.prepare('moma_shapes', built, num_trains=3)
  with pytest.raises(datasets.DatasetError, match='moma_pydoc takes no options'):
    datasets.prepare('moma_pydoc', built, seed=1)
  assert len(_source(built, 'moma_shapes', 'train[:10]+validation')) == 50


def _interrupt_after(monkeypatch, calls, action):
  real, count = shapes.example, [0]

  def wrapped(*args):
    count[0] += 1
    if count[0] == calls:
      action()
    return real(*args)
  monkeypatch.setattr(shapes, 'example', wrapped)


def test_interrupted_build_leaves_nothing_complete(tmp_path, monkeypatch):
  _interrupt_after(monkeypatch, 25, lambda: 1 / 0)
  with pytest.raises(datasets.DatasetError, match='moma_shapes.*ZeroDivisionError'):
    datasets.prepare('moma_shapes', str(tmp_path), **TINY)
  assert not list(tmp_path.rglob('dataset_info.json'))
  assert not list(tmp_path.rglob('*.array_record*'))
  monkeypatch.undo()
  assert len(datasets.data_source('moma_shapes', str(tmp_path), 'train', **TINY)) == 60


def test_killed_build_is_rebuilt(tmp_path):
  script = ('import os, sys\nfrom moma_jax.data import datasets\nfrom moma_jax.data.embedded '
            'import shapes\nreal, n = shapes.example, [0]\ndef dying(*a):\n  n[0] += 1\n'
            '  if n[0] == 30: os._exit(3)\n  return real(*a)\nshapes.example = dying\n'
            'datasets.prepare("moma_shapes", sys.argv[1], num_train=60, num_validation=10)')
  run = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True,
                       timeout=120, check=False)
  assert run.returncode == 3, run.stderr.decode()[-2000:]
  assert list(tmp_path.rglob('incomplete.*'))            # what a kill leaves behind
  assert not list(tmp_path.rglob('dataset_info.json'))
  src = datasets.data_source('moma_shapes', str(tmp_path), 'train', **TINY)
  assert len(src) == 60 and src[59]['image'].shape == (32, 32, 3)


def test_build_finished_by_another_process_is_used(tmp_path, monkeypatch):
  opts = dict(num_train=30, num_validation=5)
  _interrupt_after(monkeypatch, 10, lambda: monkeypatch.undo() or datasets.prepare(
      'moma_shapes', str(tmp_path), **opts))
  builder = datasets.prepare('moma_shapes', str(tmp_path), **opts)
  assert len(builder.as_data_source(split='validation')) == 5
  assert not list(tmp_path.rglob('incomplete.*'))


class ResearchNotes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A researcher's own dataset, prepared elsewhere; found only by its files."""
  VERSION = tfds.core.Version('0.1.0')
  code_path = None    # no checksums file to look for (see the embedded builders)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yield from ((i, {'text': f'note number {i}'}) for i in range(7))


def test_prepared_tfds_dataset_by_name(tmp_path):
  ResearchNotes(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  src = datasets.data_source('research_notes', str(tmp_path), 'train')
  assert sorted(ex['text'] for ex in _all(src)) == [b'note number %d' % i for i in range(7)]
  with pytest.raises(datasets.DatasetError, match="research_notes has no split 'valid"):
    datasets.data_source('research_notes', str(tmp_path), 'validation')
  with pytest.raises(datasets.DatasetError, match="'research_notes'.*" + re.escape(
      str(tmp_path / 'elsewhere'))):
    datasets.data_source('research_notes', str(tmp_path / 'elsewhere'), 'train')
  assert not os.path.exists(tmp_path / 'elsewhere' / 'research_notes')
