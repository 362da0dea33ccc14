"""Text tokenizers (bytes, SentencePiece) and the k-means VQ image tokenizer.

Test images are uint8 [N, 32, 32, 3]: scikit-learn's bundled 8x8 digits upscaled
bilinearly and coloured (ink on paper), and numpy-drawn coloured rectangles and discs.
MSEs are over pixels scaled to [0, 1].
"""
import os
import pickle
import time

import numpy as np
import pydoc_data.topics
import pytest

from moma_jax.data import image_tokenizer
from moma_jax.data.image_tokenizer import VQTokenizer, VQTokenizerError
from moma_jax.data import text_tokenizer
from moma_jax.data.text_tokenizer import TokenizerError

STRINGS = ('hello, world', 'déjà vu à Genève, Ærø, Øresund', '東京の天気は晴れです',
           '😀🚀 emoji 👩\u200d👩\u200d👧 and flags 🇯🇵', '', ' \t\n\r mixed  whitespace \n')
# Reconstruction bound for the default tokenizer (512 codes, 4x4 patches) on held-out
# images; measured about 0.005 against a per-image-mean baseline of about 0.03.
MSE_BOUND = 0.01


# ----------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize('text', STRINGS)
def test_bytes_round_trip(text):
  tok = text_tokenizer.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text.encode('utf-8')),)
  assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size == 256)
  assert tok.decode(ids) == text
  assert tok.decode(list(ids)) == text


def test_bytes_errors():
  tok = text_tokenizer.ByteTokenizer()
  with pytest.raises(TokenizerError, match=r'\[0, 256\)'):
    tok.decode([65, 256])
  assert tok.decode([0x80]) == '\ufffd'           # a lone continuation byte
  euro = list('€'.encode('utf-8'))                 # three bytes
  assert tok.decode([0x41] + euro[:2]) == 'A\ufffd'  # cut after its second byte
  assert tok.decode(euro[1:] + [0x41]) == '\ufffd\ufffdA'
  with pytest.raises(TokenizerError, match='not valid Unicode'):
    tok.encode('\ud800')


def _pydoc_texts(count=None):
  texts = [v for _, v in sorted(pydoc_data.topics.topics.items())]
  return texts[:count]


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  """A 300-piece unigram model trained on part of the reference manual."""
  prefix = str(tmp_path_factory.mktemp('spm') / 'tiny')
  return text_tokenizer.train_sentencepiece(_pydoc_texts(30), prefix, vocab_size=300)


def test_sentencepiece_round_trip(spm_model):
  tok = text_tokenizer.make_text_tokenizer(spm_model)
  assert isinstance(tok, text_tokenizer.SentencePieceTokenizer)
  assert tok.vocab_size == 300
  sentences = ['The for statement is used to iterate over the elements of a sequence.',
               '  Indented code:\n    x = [i * 2 for i in range(10)]\n',
               'Assignment statements (re)bind names to values.',
               ' leading and trailing spaces  ']
  for s in sentences:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) < len(s)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == s
  assert tok.encode('').shape == (0,) and tok.decode([]) == ''
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(sentences[0]), tok.encode(sentences[0]))


def test_sentencepiece_training_is_deterministic(spm_model, tmp_path):
  path = text_tokenizer.train_sentencepiece(_pydoc_texts(30), str(tmp_path / 'again'), 300)
  with open(path, 'rb') as a, open(spm_model, 'rb') as b:
    assert a.read() == b.read()
  assert os.listdir(tmp_path) == ['again.model']       # no temporary file left


def test_sentencepiece_byte_fallback_covers_any_text(tmp_path):
  path = text_tokenizer.train_sentencepiece(_pydoc_texts(), str(tmp_path / 'bf'), 600,
                                            model_type='bpe', byte_fallback=True)
  tok = text_tokenizer.make_text_tokenizer(path)
  for s in STRINGS:
    assert tok.decode(tok.encode(s)) == s


def test_make_text_tokenizer_dispatch_and_errors(tmp_path):
  assert isinstance(text_tokenizer.make_text_tokenizer('bytes'), text_tokenizer.ByteTokenizer)
  missing = str(tmp_path / 'missing.model')
  with pytest.raises(TokenizerError, match='missing.model'):
    text_tokenizer.make_text_tokenizer(missing)
  bogus = tmp_path / 'bogus.model'
  bogus.write_bytes(b'not a sentencepiece model')
  with pytest.raises(TokenizerError, match='bogus.model'):
    text_tokenizer.make_text_tokenizer(str(bogus))
  assert issubclass(TokenizerError, ValueError)


# ----------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------
def _digits(rng):
  """uint8 [1797, 32, 32, 3]: bilinearly upscaled digits, dark ink on light paper."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  # slow import
  ink = datasets.load_digits().images.astype(np.float32) / 16.0          # [N, 8, 8]
  pos = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)                   # pixel centres
  lo = np.floor(pos).astype(int)
  hi, f = np.minimum(lo + 1, 7), (pos - lo).astype(np.float32)
  rows = ink[:, lo] * (1 - f)[:, None] + ink[:, hi] * f[:, None]
  ink = rows[:, :, lo] * (1 - f) + rows[:, :, hi] * f                    # [N, 32, 32]
  pen = rng.uniform(0, 120, (len(ink), 1, 1, 3))
  paper = rng.uniform(150, 255, (len(ink), 1, 1, 3))
  return np.rint(paper + (pen - paper) * ink[..., None]).astype(np.uint8)


def _shapes(rng, n):
  """uint8 [n, 32, 32, 3]: 1-3 coloured rectangles or discs on a plain background."""
  yy, xx = np.mgrid[:32, :32]
  out = np.empty((n, 32, 32, 3), np.uint8)
  for i in range(n):
    out[i] = rng.integers(0, 256, 3)
    for _ in range(rng.integers(1, 4)):
      colour = rng.integers(0, 256, 3)
      if rng.random() < 0.5:
        (y, x), (h, w) = rng.integers(0, 28, 2), rng.integers(4, 16, 2)
        out[i, y:y + h, x:x + w] = colour
      else:
        (cy, cx), r = rng.uniform(4, 28, 2), rng.uniform(3, 9)
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
  return out


@pytest.fixture(scope='module')
def images():
  """(train [~3000, 32, 32, 3], held-out [~600, 32, 32, 3]) uint8, digits and shapes."""
  rng = np.random.default_rng(0)
  digits, shapes = _digits(rng), _shapes(rng, 1800)
  n_d, n_s = len(digits) * 5 // 6, len(shapes) * 5 // 6
  return (np.concatenate([digits[:n_d], shapes[:n_s]]),
          np.concatenate([digits[n_d:], shapes[n_s:]]))


@pytest.fixture(scope='module')
def fitted(images):
  start = time.perf_counter()
  tok = VQTokenizer.fit(images[0], seed=0)
  print(f'fit 512 codes on {len(images[0])} images: {time.perf_counter() - start:.2f}s')
  return tok


def _mse(a, b):
  return float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))


def test_vq_shapes_and_dtypes(fitted, images):
  tok = fitted
  assert (tok.image_size, tok.patch, tok.codes_per_image, tok.vocab_size) == (32, 4, 64, 512)
  assert tok.codebook.dtype == np.float32 and tok.codebook.shape == (512, 48)
  held = images[1][:6]
  codes = tok.encode(held)
  assert codes.dtype == np.int32 and codes.shape == (6, 64)
  assert codes.min() >= 0 and codes.max() < 512
  np.testing.assert_array_equal(tok.encode(held[0]), codes[0])             # one image
  np.testing.assert_array_equal(tok.encode(held.reshape(2, 3, 32, 32, 3)),  # any batch
                                codes.reshape(2, 3, 64))
  out = tok.decode(codes)
  assert out.dtype == np.uint8 and out.shape == held.shape
  assert tok.decode(codes[0]).shape == (32, 32, 3)
  # Codes are in raster order: a patch changed in the image changes only its own code.
  changed = held[0].copy()
  changed[8:12, 20:24] = 255 - changed[8:12, 20:24]
  differs = np.flatnonzero(tok.encode(changed) != codes[0])
  assert set(differs) <= {2 * 8 + 5}


def test_vq_reconstruction_beats_mean_colour(fitted, images):
  held = images[1]
  mse = _mse(fitted.decode(fitted.encode(held)), held)
  mean = held.reshape(len(held), -1, 3).mean(1)[:, None, None, :]
  baseline = _mse(np.broadcast_to(mean, held.shape), held)
  print(f'held-out MSE: VQ {mse:.5f}, per-image mean colour {baseline:.5f}')
  assert mse < MSE_BOUND
  assert mse <= 0.5 * baseline


def test_vq_fit_is_deterministic(images):
  train = images[0][::4]
  kw = dict(codebook_size=128, max_patches=20_000, iters=10)
  a = VQTokenizer.fit(train, seed=3, **kw)
  b = VQTokenizer.fit(train, seed=3, **kw)
  c = VQTokenizer.fit(train, seed=4, **kw)
  np.testing.assert_array_equal(a.codebook, b.codebook)
  assert not np.array_equal(a.codebook, c.codebook)


def test_vq_fewer_distinct_patches_than_codes():
  # Four flat colours give four distinct patches: k-means++ runs out of spread and
  # clusters go empty; the fit must still finish and reproduce every image exactly.
  colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]], np.uint8)
  imgs = np.broadcast_to(colours[:, None, None, :], (4, 8, 8, 3)).copy()
  tok = VQTokenizer.fit(imgs, codebook_size=16, patch=4, iters=5)
  assert tok.codes_per_image == 4 and tok.vocab_size == 16
  np.testing.assert_array_equal(tok.decode(tok.encode(imgs)), imgs)


def test_vq_progress_callback(images):
  steps = []
  VQTokenizer.fit(images[0][:200], codebook_size=32, max_patches=5000, iters=4,
                  progress=lambda step, mse: steps.append((step, mse)))
  assert [s for s, _ in steps] == list(range(len(steps))) and 1 <= len(steps) <= 4
  assert all(b <= a + 1e-9 for (_, a), (_, b) in zip(steps, steps[1:]))   # Lloyd descends


def test_vq_input_validation(fitted):
  tok = fitted
  with pytest.raises(VQTokenizerError, match=r'\[\.\.\., 32, 32, 3\].*\(28, 28, 3\)'):
    tok.encode(np.zeros((28, 28, 3), np.uint8))
  with pytest.raises(VQTokenizerError, match='float32'):
    tok.encode(np.zeros((32, 32, 3), np.float32))
  with pytest.raises(VQTokenizerError, match=r'\(2, 32, 32, 4\)'):
    tok.encode(np.zeros((2, 32, 32, 4), np.uint8))
  with pytest.raises(VQTokenizerError, match=r'\[0, 512\)'):
    tok.decode(np.full(64, 512))
  with pytest.raises(VQTokenizerError, match=r'\[0, 512\)'):
    tok.decode(np.full(64, -1))
  with pytest.raises(VQTokenizerError, match=r'\[\.\.\., 64\]'):
    tok.decode(np.zeros(63, np.int32))
  with pytest.raises(VQTokenizerError, match=r'\[N, H, W = H, 3\].*\(32, 32, 3\)'):
    VQTokenizer.fit(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(VQTokenizerError, match='patches cannot fit'):
    VQTokenizer.fit(np.zeros((1, 32, 32, 3), np.uint8), codebook_size=512)
  assert issubclass(VQTokenizerError, ValueError)


def test_vq_save_load(fitted, images, tmp_path):
  path = str(tmp_path / 'vq.npz')
  fitted.save(path)
  assert os.listdir(tmp_path) == ['vq.npz']                # no temporary file left
  loaded = VQTokenizer.load(path)
  assert (loaded.image_size, loaded.patch, loaded.vocab_size) == (32, 4, 512)
  np.testing.assert_array_equal(loaded.codebook, fitted.codebook)
  np.testing.assert_array_equal(loaded.encode(images[1]), fitted.encode(images[1]))
  assert os.path.getsize(path) < 200_000

  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(open(path, 'rb').read()[:os.path.getsize(path) // 2])
  with pytest.raises(VQTokenizerError, match='truncated.npz'):
    VQTokenizer.load(str(truncated))
  with pytest.raises(VQTokenizerError, match='missing.npz'):
    VQTokenizer.load(str(tmp_path / 'missing.npz'))


def test_vq_interrupted_save_leaves_nothing(fitted, tmp_path, monkeypatch):
  def broken_savez(f, **arrays):
    f.write(b'PK\x03\x04 partial')
    raise KeyboardInterrupt
  monkeypatch.setattr(image_tokenizer.np, 'savez', broken_savez)
  with pytest.raises(KeyboardInterrupt):
    fitted.save(str(tmp_path / 'vq.npz'))
  assert os.listdir(tmp_path) == []
