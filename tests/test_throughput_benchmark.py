"""benchmarks/throughput.py runs end to end (the study's last step): a table row per
variant with a positive rate, dense first at 1.00."""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'throughput.py')


def test_throughput_table_has_a_rate_per_variant(capsys):
  spec = importlib.util.spec_from_file_location('throughput', _PATH)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(['--seq', '32', '--batch', '8', '--steps', '1', '--repeats', '1',
              '--warmup', '1', '--variants', 'dense,moma_4t4i'])
  rows = [l.split('|')[1:-1] for l in capsys.readouterr().out.splitlines()
          if l.startswith('| dense') or l.startswith('| moma_4t4i')]
  assert [r[0].strip() for r in rows] == ['dense', 'moma_4t4i'], rows
  assert rows[0][5].strip() == '1.00'
  assert all(float(r[4].replace(',', '')) > 0 for r in rows), rows
