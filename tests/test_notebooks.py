"""The notebooks in notebooks/: stored without outputs, and run top to bottom (tiny).

The slow tests execute each notebook in a fresh IPython kernel with nbclient, as Colab or
Jupyter would, with MOMA_NOTEBOOK_TINY=1 (tiny models, a few steps), the datasets of the
shared `data_setup` fixture (MOMA_NOTEBOOK_DATA_DIR) and their runs written under the
test's tmp_path (MOMA_NOTEBOOK_WORKDIR). They need nbformat, nbclient and ipykernel.
"""
import json
import pathlib
import re

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NAMES = ('routing_explorer.ipynb', 'flops_savings.ipynb', 'generation.ipynb')
CELL_TIMEOUT_S = 600


@pytest.mark.parametrize('name', NAMES)
def test_stored_without_outputs(name):
  notebook = json.loads((NOTEBOOKS / name).read_text())
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  assert code, f'{name} has no code cells'
  for i, cell in enumerate(code):
    assert cell['outputs'] == [], f'{name}: code cell {i} is stored with outputs'
    assert cell['execution_count'] is None, f'{name}: code cell {i} has an execution count'


def _execute(name, data_dir, workdir, monkeypatch):
  """Runs notebooks/NAME top to bottom in a new python3 kernel; returns the notebook."""
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  # The kernel is a child process: it inherits this environment (the compilation cache
  # too, tests/conftest.py).
  monkeypatch.setenv('MOMA_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('MOMA_NOTEBOOK_DATA_DIR', str(data_dir))
  monkeypatch.setenv('MOMA_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('MPLBACKEND', raising=False)    # the notebooks draw inline
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
      resources={'metadata': {'path': str(NOTEBOOKS)}})   # cwd: notebooks/, as in Jupyter
  client.execute()     # raises CellExecutionError, with the traceback, if a cell fails
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type == 'code':
      assert cell.execution_count is not None, f'{name}: code cell {i} did not run'
      assert not [o for o in cell.outputs if o.output_type == 'error'], i
  return notebook


def _outputs(notebook, mime):
  """The texts of every output of this MIME type ('stream' for printed text)."""
  out = []
  for cell in notebook.cells:
    for o in cell.get('outputs', []):
      if mime == 'stream' and o.output_type == 'stream' and o.name == 'stdout':
        out.append(o.text)
      elif mime in o.get('data', {}):
        out.append(o.data[mime])
  return out


@pytest.mark.slow
def test_routing_explorer_runs(data_setup, tmp_path, monkeypatch):
  notebook = _execute('routing_explorer.ipynb', data_setup[0].data.data_dir, tmp_path,
                      monkeypatch)
  printed = ''.join(_outputs(notebook, 'stream'))
  # The left-behind fractions of both tiny layers (the notebook checks them against the
  # model's route_stats itself).
  for layer in (0, 1):
    assert re.search(rf'layer {layer}: left behind text [01]\.\d{{3}}, image [01]\.\d{{3}}',
                     printed), printed
  assert re.search(r'\d+ tokens: ".+" \[image: 66 tokens\] ".+"', printed), printed
  # The document's image, then figures (1) to (4).
  assert len(_outputs(notebook, 'image/png')) >= 5
  assert (tmp_path / 'routing_explorer' / 'moma_4t4i_tiny' / 'checkpoints').is_dir()


@pytest.mark.slow
def test_flops_savings_runs(data_setup, tmp_path, monkeypatch):
  notebook = _execute('flops_savings.ipynb', data_setup[0].data.data_dir, tmp_path,
                      monkeypatch)
  # It trained its own runs under MOMA_NOTEBOOK_WORKDIR, not runs/quickstart.
  for variant in ('dense', 'moma_4t4i'):
    assert (tmp_path / 'flops_savings_tiny' / variant / 'metrics.jsonl').is_file(), variant
  tables = [t for t in _outputs(notebook, 'text/markdown') if t.startswith('| run |')]
  assert len(tables) == 1, tables
  lines = [line for line in tables[0].splitlines() if line.startswith('|')]
  split = lambda line: [c.strip() for c in line.strip().strip('|').split('|')]
  header = split(lines[0])
  assert {'eta text', 'eta image', 'eta overall'} <= set(header), header
  row = dict(zip(header, split(lines[2])))       # lines[1] is the |---| line
  assert (row['run'], row['loss'], row['point']) == ('moma_4t4i', 'train (noisier)',
                                                    'last measured'), row
  for modality in ('text', 'image', 'overall'):
    # A finite eta where both curves are measured, @ the run's FLOPs there.
    assert re.fullmatch(r'\d+\.\d\d @ \S+', row[f'eta {modality}']), row
  # loss vs FLOPs, eta vs FLOPs, left behind vs step.
  assert len(_outputs(notebook, 'image/png')) >= 3
  printed = ''.join(_outputs(notebook, 'stream'))
  assert 'training rows' in printed and 'route/' in printed


@pytest.mark.slow
def test_generation_runs(data_setup, tmp_path, monkeypatch):
  notebook = _execute('generation.ipynb', data_setup[0].data.data_dir, tmp_path,
                      monkeypatch)
  printed = ''.join(_outputs(notebook, 'stream'))
  # The greedy captions checked token by token against the full causal pass.
  match = re.search(r'KV-cache decoding matches the full causal pass: (\d+) tokens', printed)
  assert match and int(match.group(1)) > 0, printed
  # The gap table: a header, then per modality teacher-forced, causal, their signed
  # difference and the routers' balanced accuracy.
  row = lambda mo: rf'{mo} +\d+\.\d{{4}} +\d+\.\d{{4}} +[+-]\d+\.\d{{4}} +[01]\.\d{{3}}\n'
  assert re.search(r'modality +teacher-forced +causal +gap \(causal - t\.f\.\) +'
                   r'router bal\. acc\.\n' + row('text') + row('image'), printed), printed
  assert re.search(r'image 0: +generated: .*\n +true: +[\'"].+[\'"]', printed), printed
  # The loss bars, the text-to-image grid, the captioned images (and any continuation's).
  assert len(_outputs(notebook, 'image/png')) >= 3
  workdir = tmp_path / 'generation' / 'moma_4t4i_tiny'
  assert (workdir / 'aux_router' / 'result.json').is_file()
  assert (workdir / 'checkpoints').is_dir()
