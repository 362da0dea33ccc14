"""The grain pipeline: determinism, resumption, process sharding, packing, evaluation."""
import copy
import json

import numpy as np
import pytest

from moma_jax.data import datasets
from moma_jax.data import documents as docs_lib
from moma_jax.data import pipeline
from moma_jax.data.preview import batch_documents, parse_segment, render_batch
from moma_jax.data import vocab as vocab_lib
from moma_jax.model.attention_kernels import attention_mask


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_seed_same_batches_and_exact_resume(data_setup):
  config, tok = data_setup
  first = take(pipeline.train_iterator(config, tok), 5)
  again = pipeline.train_iterator(config, tok)
  for a, b in zip(first, take(again, 5)):
    assert_batches_equal(a, b)
  interrupted = pipeline.train_iterator(config, tok)
  take(interrupted, 2)
  state = interrupted.get_state()
  resumed = pipeline.train_iterator(config, tok)
  resumed.set_state(state)
  for a, b in zip(first[2:], take(resumed, 3)):
    assert_batches_equal(a, b)
  other = copy.deepcopy(config)
  other.data.seed = 1
  assert not np.array_equal(
      next(pipeline.train_iterator(other, tok))['tokens'], first[0]['tokens'])


def test_resume_from_a_json_round_trip_of_the_state_at_every_step(data_setup):
  """Checkpoints keep the iterator's state as JSON: restored from it after any step,
  the iterator makes the batches the uninterrupted one made. Row streams whose last row
  ended exactly at a document's end are among them (checked), the case a JSON round trip
  of grain's state used to get wrong."""
  config, tok = data_setup
  it = pipeline.train_iterator(config, tok)
  states, batches = [], []
  for _ in range(24):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  no_leftover = [all(tuple(s) == (-1, -1) for s in row['remainder_slices'].values())
                 for state in states[1:] for row in state['rows']]
  assert sum(no_leftover) >= 2, 'no row stream ended at a document boundary'
  for k in range(1, len(states) - 1):
    resumed = pipeline.train_iterator(config, tok)
    resumed.set_state(states[k])
    for want in batches[k:k + 2]:
      assert_batches_equal(next(resumed), want)


@pytest.mark.parametrize('processes', [2, 4])
def test_process_shards_concatenate_to_the_global_batch(data_setup, processes):
  config, tok = data_setup
  single = take(pipeline.train_iterator(config, tok), 2)
  shards = [take(pipeline.train_iterator(config, tok, p, processes), 2) for p in range(processes)]
  rows = [set(pipeline.process_rows(8, p, processes)) for p in range(processes)]
  assert set().union(*rows) == set(range(8))
  assert sum(map(len, rows)) == 8                       # disjoint
  for step in range(2):
    joined = {k: np.concatenate([s[step][k] for s in shards]) for k in single[step]}
    assert_batches_equal(joined, single[step])


def test_packing_keeps_documents_apart(data_setup):
  config, tok = data_setup
  for batch in take(pipeline.train_iterator(config, tok), 3):
    seg, pos, tokens = batch['segment_ids'], batch['positions'], batch['tokens']
    assert tokens.shape == (8, 128) and tokens.dtype == np.int32
    np.testing.assert_array_equal(batch['modality'], tok.vocab.modality_of(tokens))
    np.testing.assert_array_equal(batch['loss_mask'], seg > 0)
    assert np.all(tokens[seg == 0] == vocab_lib.PAD)
    mask = np.asarray(attention_mask(seg))[:, 0]        # [B, q, k]
    for b in range(8):
      for s in np.unique(seg[b][seg[b] > 0]):
        where = np.flatnonzero(seg[b] == s)
        np.testing.assert_array_equal(pos[b, where], np.arange(where.size))
        doc = tokens[b, where]
        # One document per segment: <bos> only first, <eos> only last.
        assert np.all(doc[1:] != vocab_lib.BOS) and np.all(doc[:-1] != vocab_lib.EOS)
      q, k = np.nonzero(mask[b])
      assert np.all(seg[b, q] == seg[b, k]) and np.all(k <= q) and np.all(seg[b, q] > 0)


def test_documents_mix_modalities_in_every_format(data_setup):
  config, tok = data_setup
  kinds = set()
  for batch in take(pipeline.train_iterator(config, tok), 3):
    for ids in batch_documents(batch):
      parts = parse_segment(tok, ids)
      kinds.add(tuple(kind for kind, p in parts if not (kind == 'text' and p == '[partial image]')))
  assert ('text',) in kinds                              # text-only documents
  assert any(k[:2] == ('text', 'image') for k in kinds)  # caption then image
  assert any(k[:2] == ('image', 'text') for k in kinds)  # image then caption


def test_document_parses_back(data_setup):
  _, tok = data_setup
  image = np.zeros((32, 32, 3), np.uint8)
  image[8:24, 8:24] = (200, 30, 30)
  doc = docs_lib.image_text_document(tok, [{'caption': 'a red square', 'image': image}],
                                     docs_lib.FORMATS.index('caption_image'), 'test')
  parts = parse_segment(tok, doc['tokens'])
  assert [k for k, _ in parts] == ['text', 'image'] and parts[0][1] == 'a red square'
  np.testing.assert_array_equal(parts[1][1], tok.image.decode(tok.image.encode(image)))


def test_eval_stream_covers_the_split_once(data_setup):
  config, tok = data_setup
  docs = pipeline.DatasetDocuments(config, 'moma_digits', 'validation', tok)
  total = sum(len(docs[d]['tokens']) for d in range(len(docs)))
  batches = list(pipeline.eval_batches(config, tok, 'moma_digits'))
  assert sum(int((b['segment_ids'] > 0).sum()) for b in batches) == total
  halves = [list(pipeline.eval_batches(config, tok, 'moma_digits', p, 2)) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)


def test_bad_examples_name_dataset_and_index(data_setup):
  _, tok = data_setup
  with pytest.raises(docs_lib.DocumentError, match='mine example 3: token id 9999'):
    docs_lib.pretokenized_document(tok, np.array([1, 9999]), None, 'mine example 3')
  with pytest.raises(docs_lib.DocumentError, match='mine example 4: token 1 .* marked modality 1'):
    docs_lib.pretokenized_document(tok, np.array([1, 20, 2]), np.array([0, 1, 0]), 'mine example 4')
  with pytest.raises(docs_lib.DocumentError, match='mine example 5: empty document'):
    docs_lib.text_document(tok, '', 'mine example 5')
  with pytest.raises(docs_lib.DocumentError, match=r'mine example 6: image of shape \(8, 8, 3\)'):
    docs_lib.image_text_document(tok, [{'caption': 'x', 'image': np.zeros((8, 8, 3), np.uint8)}],
                                 0, 'mine example 6')


def test_preview_renders(data_setup, tmp_path):
  config, tok = data_setup
  batch = next(pipeline.train_iterator(config, tok))
  out = tmp_path / 'preview.png'
  assert render_batch(tok, batch, str(out)) > 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_vq_reconstructs_validation_images(data_setup):
  """decode(encode(x)) on the embedded validation splits: MSE (pixels in [0, 1]) below
  0.01 and at most half that of replacing each image by its mean colour."""
  config, tok = data_setup
  for name in ('moma_shapes', 'moma_digits'):
    src = datasets.data_source(name, config.data.data_dir, 'validation')
    images = np.stack([src[i]['image'] for i in range(len(src))])
    x = images / 255.0
    mse = np.mean((tok.image.decode(tok.image.encode(images)) / 255.0 - x) ** 2)
    baseline = np.mean((x.mean(axis=(1, 2), keepdims=True) - x) ** 2)
    assert mse < 0.01 and mse <= baseline / 2, (name, mse, baseline)


def test_tokenizers_follow_the_configured_modalities(data_setup):
  """The modality set is the config's: any of the pipeline's tokenizers, in any order;
  the vocabulary's ranges and the batches' modality ids follow that order."""
  import copy as copy_lib
  from moma_jax import configs
  base, tok = data_setup
  text_only = copy_lib.deepcopy(base)
  text_only.model.modalities, text_only.model.experts = ('text',), (4,)
  text_only.data.name = 'moma_pydoc'
  t = pipeline.load_tokenizers(configs.validate(text_only))
  assert t.vocab.modalities == ('text',)
  assert t.vocab.size == len(vocab_lib.SPECIALS) + tok.text.vocab_size
  batch = next(pipeline.train_iterator(text_only, t, 0, 1))
  assert (batch['modality'] == 0).all() and (batch['segment_ids'] > 0).any()
  with pytest.raises(docs_lib.DocumentError, match=r"shapes/3: holds image, which is not "
                     r"among this run's model.modalities \('text',\)"):
    docs_lib.example_document(t, dict(image=np.zeros(tok.image_shape, np.uint8),
                                      caption=b'a red square'), 'shapes/3')

  swapped = copy_lib.deepcopy(base)
  swapped.model.modalities = ('image', 'text')
  s = pipeline.load_tokenizers(configs.validate(swapped))
  assert s.vocab.start('image') == len(vocab_lib.SPECIALS)
  assert s.vocab.start('text') == len(vocab_lib.SPECIALS) + tok.image.vocab_size
  doc = docs_lib.text_document(s, 'def f(): pass', 'pydoc/0')
  body = doc['modality'][1:-1]                    # <bos> and <eos> belong to modality 0
  assert (body == 1).all() and (doc['tokens'][1:-1] >= s.vocab.start('text')).all()

  unknown = copy_lib.deepcopy(base)
  unknown.model.modalities, unknown.model.experts = ('text', 'audio'), (4, 4)
  with pytest.raises(configs.ConfigError, match="^model.modalities: no tokenizer for "
                     "'audio': the data pipeline reads 'text', 'image'$"):
    pipeline.load_tokenizers(configs.validate(unknown))


def test_data_build_reports_the_configured_sizes(data_setup, capsys):
  """`moma-data build` builds and counts each dataset at its `data.options` size."""
  from moma_jax.cli import data as data_cli
  config, _ = data_setup
  config = copy.deepcopy(config)
  config.data.options = 'moma_shapes:num_train=30:num_validation=7'
  data_cli.build(config)
  line = next(l for l in capsys.readouterr().out.splitlines() if 'moma_shapes' in l)
  assert 'train 30, validation 7' in line, line
