"""The project's structural rules, read from the source with `ast` (nothing is imported).

  flags     absl / ml_collections flags are defined and read only in moma_jax/cli/
  cycles    no import cycle among moma_jax/ and pallas_kernels/ modules
  size      no module over MAX_LINES lines
  kernels   pallas_kernels/ imports nothing from moma_jax
  design    every "design §N" citation names a numbered heading of docs/design.md
  replace   os.replace in one place only: run_dir.atomic_path, which every whole-file
            write goes through
"""
import ast
import functools
import json
import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
PACKAGES = ('moma_jax', 'pallas_kernels')
MAX_FUNCTION_LINES = 60
MAX_LINES = 400
# Folders never scanned: caches, builds, environments, run outputs.
_SKIP_DIRS = {'__pycache__', 'build', 'dist', 'runs', 'workdirs', 'data_cache'}


def _walk(top):
  """Paths relative to ROOT of the files under ROOT/top, sorted, skipping _SKIP_DIRS."""
  out = []
  for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
    dirs[:] = [d for d in dirs if not d.startswith('.') and d not in _SKIP_DIRS
               and not d.endswith('.egg-info')]
    out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
  return sorted(out)


@functools.cache
def _modules():
  """Dotted module name -> path relative to ROOT, for every .py file of PACKAGES."""
  modules = {}
  for top in PACKAGES:
    for path in _walk(top):
      if path.endswith('.py'):
        parts = path[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        modules['.'.join(parts)] = path
  return modules


@functools.cache
def _tree(path):
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    return ast.parse(f.read(), filename=path)


def _imported_names(module, path):
  """(lineno, dotted name) of each import in the module, function-level ones included.

  `import a.b` gives 'a.b'; `from a import b` gives 'a.b' and, when b is no module of
  PACKAGES (a function, a class), 'a'; relative imports are resolved against the
  module's package.
  """
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  for node in ast.walk(_tree(path)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split('.')[:len(package.split('.')) - node.level + 1]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      for alias in node.names:
        name = f'{source}.{alias.name}'
        yield node.lineno, name if name in _modules() else source


def _import_graph():
  """Module -> the set of PACKAGES modules it imports (itself left out)."""
  modules = _modules()
  return {m: {name for _, name in _imported_names(m, path) if name in modules and name != m}
          for m, path in modules.items()}


def _cycles(graph):
  """One cycle (a list of modules, first == last) per strongly connected component."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):  # Tarjan's algorithm; the graph is small, so recursion is fine.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for component in components:
    # The shortest way round from the component's first module, inside the component.
    start = min(component)
    came_from, frontier = {}, [start]
    while start not in came_from:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & component):
          if w not in came_from:
            came_from[w] = v
            nxt.append(w)
      frontier = nxt
    cycle = [start]
    while len(cycle) == 1 or cycle[-1] != start:
      cycle.append(came_from[cycle[-1]])
    cycles.append(cycle[::-1])
  return cycles


# ----------------------------------------------------------------------------------
# The rules.

_FLAG_MODULES = ('absl.flags', 'ml_collections.config_flags')


def _is_flags(name):
  return any(name == m or name.startswith(m + '.') for m in _FLAG_MODULES)


def test_only_cli_modules_use_flags():
  offenders = []
  for module, path in _modules().items():
    if not module.startswith('moma_jax.') or module.startswith('moma_jax.cli.') \
        or module == 'moma_jax.cli':
      continue
    for node in ast.walk(_tree(path)):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
        names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
      else:
        continue
      offenders += [f'{path}:{node.lineno}: {n}' for n in names if _is_flags(n)]
  assert not offenders, 'flags outside moma_jax/cli/:\n' + '\n'.join(offenders)


def test_no_import_cycles():
  cycles = _cycles(_import_graph())
  assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(c) for c in cycles)


def test_cycle_finder_finds_mutual_and_longer_cycles():
  # The rule above passes vacuously if _cycles sees nothing; it must see these.
  graph = {'a': {'b'}, 'b': {'a', 'c'}, 'c': set(), 'd': {'e'}, 'e': {'f'}, 'f': {'d'}}
  assert sorted(_cycles(graph)) == [['a', 'b', 'a'], ['d', 'e', 'f', 'd']]
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []


def test_import_graph_sees_the_package():
  # Guards the resolver: from-imports of modules and of names inside them both count.
  graph = _import_graph()
  assert 'moma_jax.usage' in graph['moma_jax.data.checks']      # from moma_jax import usage
  assert 'moma_jax.usage' in graph['moma_jax.cli.command']      # from ...usage import UsageError


def test_no_module_over_max_lines():
  long = []
  for path in _modules().values():
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
      lines = len(f.read().splitlines())
    if lines > MAX_LINES:
      long.append(f'{path}: {lines} lines')
  assert not long, f'over {MAX_LINES} lines:\n' + '\n'.join(long)


def test_no_training_function_over_max_function_lines():
  """The training loop stays a sequence of short actions a reader can hold."""
  long = []
  for module, path in _modules().items():
    if not module.startswith('moma_jax.training'):
      continue
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f'{path}: {node.name} has {lines} lines')
  assert not long, f'over {MAX_FUNCTION_LINES} lines:\n' + '\n'.join(long)


def test_pallas_kernels_import_nothing_of_moma_jax():
  offenders = []
  for module, path in _modules().items():
    if module.split('.')[0] != 'pallas_kernels':
      continue
    offenders += [f'{path}:{line}: {name}' for line, name in _imported_names(module, path)
                  if name.split('.')[0] == 'moma_jax']
  assert not offenders, 'pallas_kernels/ importing moma_jax:\n' + '\n'.join(offenders)


# "design §N", "docs/design.md §N", "design.md §N.M", with N and M numbers: the number
# is what must resolve.
_CITATION = re.compile(r'(?:docs/design\.md|\bdesign(?:\.md)?)\s+§\s*(\d+(?:\.\d+)?)')
# "## 4. The routing plan" (N), "### 4.2 Capacity" (N.M).
_HEADING = re.compile(r'^(#{2,3}) (\d+(?:\.\d+)?)\.?\s+\S', re.MULTILINE)


def _design_sections():
  with open(os.path.join(ROOT, 'docs', 'design.md'), encoding='utf-8') as f:
    text = f.read()
  # Only a heading of the number's own depth counts: '## N', '### N.M'.
  return {number for hashes, number in _HEADING.findall(text)
          if len(hashes) == 2 + number.count('.')}


def _cited_texts():
  """(where, text) of every .py file, README.md, docs/*.md and notebook cell."""
  for path in _walk('.'):
    if path.endswith('.py') or path == 'README.md' or (
        path.startswith('docs' + os.sep) and path.endswith('.md')):
      with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        yield path, f.read()
    elif path.endswith('.ipynb'):
      with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        cells = json.load(f)['cells']
      for i, cell in enumerate(cells):
        source = cell.get('source', '')
        yield f'{path} cell {i}', ''.join(source) if isinstance(source, list) else source


def test_design_citations_resolve():
  sections = _design_sections()
  assert {'1', '6'} <= sections, sorted(sections)  # the headings are read at all
  found, broken = 0, []
  for where, text in _cited_texts():
    for match in _CITATION.finditer(text):
      found += 1
      if match.group(1) not in sections:
        line = text.count('\n', 0, match.start()) + 1
        broken.append(f'{where}:{line}: {match.group(0)!r}')
  assert found, 'no design citations found: is the pattern still the one in use?'
  assert not broken, (f'citations of docs/design.md sections it does not have '
                      f'(it has {", ".join(sorted(sections))}):\n' + '\n'.join(broken))


# Spelled with \u00a7 so that this file holds no citation of its own.
@pytest.mark.parametrize('text, cited', [
    ('see design \u00a74', ['4']), ('(docs/design.md \u00a76)', ['6']),
    ('design.md \u00a75.2', ['5.2']), ('docs/design.md\n\u00a77', ['7']),
    ('redesign \u00a73', []), ('design \u00a7N', [])])
def test_citation_pattern(text, cited):
  assert _CITATION.findall(text) == cited


def _os_replace_uses(path):
  """(lineno, enclosing function or None) of each os.replace in the module."""
  uses = []

  def visit(node, function):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      function = node.name
    if (isinstance(node, ast.Attribute) and node.attr == 'replace'
        and isinstance(node.value, ast.Name) and node.value.id == 'os'):
      uses.append((node.lineno, function))
    if isinstance(node, ast.ImportFrom) and node.module == 'os' and any(
        a.name == 'replace' for a in node.names):
      uses.append((node.lineno, function))
    for child in ast.iter_child_nodes(node):
      visit(child, function)

  visit(_tree(path), None)
  return uses


def test_os_replace_only_in_atomic_path():
  uses = [(path, line, function) for module, path in _modules().items()
          if module.split('.')[0] == 'moma_jax'
          for line, function in _os_replace_uses(path)]
  where = '\n'.join(f'{p}:{line} ({f"in {f}" if f else "at module level"})'
                    for p, line, f in uses)
  assert len(uses) == 1, f'os.replace must appear once, in run_dir.atomic_path:\n{where}'
  path, _, function = uses[0]
  assert (path, function) == (os.path.join('moma_jax', 'run_dir.py'), 'atomic_path'), where
