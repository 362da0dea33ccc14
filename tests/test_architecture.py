"""The project's structural rules, read from the source with `ast` (nothing is imported).

  flags     absl / ml_collections flags are defined and read only in moma_jax/cli/
  cycles    no import cycle among moma_jax/ and pallas_kernels/ modules
  size      no module over MAX_LINES lines
  kernels   pallas_kernels/ imports nothing from moma_jax
  design    every "design §N" citation names a numbered heading of docs/design.md
  replace   os.replace in one place only: run_dir.atomic_path, which every whole-file
            write goes through
  packages  imports follow docs/design.md's package table; the model imports no optax
  mesh      axis names are declared only in moma_jax/model/mesh.py
  names     keys between modules are built only by moma_jax/model/names.py, and text
            is parsed only where its format is owned
  state     no module changes its module-level names at run time
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
# Folders never scanned: caches anywhere; builds and run outputs at the top only
# (moma_jax/runs/ is a package).
_SKIP_DIRS = {'__pycache__'}
_SKIP_TOP_DIRS = {'build', 'dist', 'runs', 'workdirs', 'data_cache'}


def _walk(top):
  """Paths relative to ROOT of the files under ROOT/top, sorted, skipping _SKIP_DIRS."""
  out = []
  for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
    top_level = os.path.samefile(folder, ROOT)
    dirs[:] = [d for d in dirs if not d.startswith('.') and d not in _SKIP_DIRS
               and not (top_level and d in _SKIP_TOP_DIRS) and not d.endswith('.egg-info')]
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


# ----------------------------------------------------------------------------------
# Package direction: docs/design.md §3's table, read from the document itself.

_ORDER_BLOCK = re.compile(r'<!-- package order -->\n(.*?)<!-- end package order -->', re.S)
# Third-party libraries a package must not import: the model is the network alone.
_FORBIDDEN_LIBRARIES = {'model': ('optax', 'orbax')}
_API = 'moma_jax'          # moma_jax/__init__.py: moma_jax.load, above every package


def _package_order():
  """Package -> the set of packages it may import from (itself included)."""
  with open(os.path.join(ROOT, 'docs', 'design.md'), encoding='utf-8') as f:
    block = _ORDER_BLOCK.search(f.read()).group(1)
  rows = [line.strip('|').split('|') for line in block.splitlines()
          if line.startswith('|') and not line.startswith('|---')][1:]
  order = {}
  for package, _, imports in rows:
    package = package.strip()
    names = {n.strip() for n in imports.split(',')} - {'-', ''}
    order[package] = set(order) | {package} if names == {'every package'} \
        else names | {package}
  return order


def _package_of(module):
  """'core', a moma_jax subpackage's name, or None (not moma_jax, or its __init__)."""
  parts = module.split('.')
  if parts[0] != 'moma_jax' or module == _API:
    return None
  return parts[1] if os.path.isdir(os.path.join(ROOT, 'moma_jax', parts[1])) else 'core'


def _direction_offenders(edges, order):
  """'path:line: a -> b' for each (module, path, line, imported) against `order`."""
  offenders = []
  for module, path, line, name in edges:
    source, target = _package_of(module), _package_of(name)
    if source and target and target not in order[source]:
      offenders.append(f'{path}:{line}: {source} -> {target} ({name})')
  return offenders


def _edges():
  modules = _modules()
  for module, path in modules.items():
    for line, name in _imported_names(module, path):
      yield module, path, line, name


def test_packages_depend_in_the_documented_order():
  order = _package_order()
  packages = {_package_of(m) for m in _modules()} - {None}
  assert packages == set(order), ('docs/design.md §3 lists other packages than '
                                  f'moma_jax/ has: {sorted(packages ^ set(order))}')
  offenders = _direction_offenders(_edges(), order)
  assert not offenders, 'imports against the package order of docs/design.md §3:\n' + \
      '\n'.join(offenders)


def test_package_order_catches_the_old_imports():
  # Imports this codebase once had; each breaks the order, so the rule above can fail.
  order = _package_order()
  old = [('moma_jax.training.upcycle', 'u.py', 1, 'moma_jax.inference.saved_run'),
         ('moma_jax.inference.saved_run', 's.py', 2, 'moma_jax.training.state'),
         ('moma_jax.analysis.aot', 'a.py', 3, 'moma_jax.training.step'),
         ('moma_jax.model.layers', 'l.py', 4, 'moma_jax.data.pipeline')]
  assert len(_direction_offenders(old, order)) == len(old)
  assert not _direction_offenders(
      [('moma_jax.cli.train', 't.py', 1, 'moma_jax.training.trainer'),
       ('moma_jax.training.step', 'p.py', 1, 'moma_jax.configs')], order)


def test_packages_skip_forbidden_libraries():
  offenders = []
  for module, path, line, name in _edges():
    banned = _FORBIDDEN_LIBRARIES.get(_package_of(module), ())
    if name.split('.')[0] in banned:
      offenders.append(f'{path}:{line}: {name}')
  assert not offenders, 'libraries a package must not import:\n' + '\n'.join(offenders)


# ----------------------------------------------------------------------------------
# The mesh's axis names are declared once, in moma_jax/model/mesh.py.

_AXIS_NAMES = frozenset({'data', 'fsdp', 'expert', 'tensor'})


def _axis_constants(path):
  """(lineno, name) of module-level constants holding axis names (a name or a tuple)."""
  found = []
  for node in _tree(path).body:
    if isinstance(node, ast.Assign):
      value = node.value
      strings = value.elts if isinstance(value, ast.Tuple) else [value]
      if strings and all(isinstance(s, ast.Constant) and s.value in _AXIS_NAMES
                         for s in strings):
        found += [(node.lineno, ast.unparse(t)) for t in node.targets]
  return found


def test_axis_names_are_declared_only_in_the_mesh_module():
  mesh_path = os.path.join('moma_jax', 'model', 'mesh.py')
  offenders = [f'{path}:{line}: {name}' for module, path in _modules().items()
               if path != mesh_path for line, name in _axis_constants(path)]
  assert not offenders, 'axis names declared outside model/mesh.py:\n' + '\n'.join(offenders)
  assert {n for _, n in _axis_constants(mesh_path)} >= {'DATA', 'FSDP', 'EXPERT', 'TENSOR'}


# ----------------------------------------------------------------------------------
# No module-level state that code changes: nothing for a test to patch or a call to leak.

_MUTATORS = frozenset({'append', 'extend', 'insert', 'update', 'pop', 'popitem', 'clear',
                       'setdefault', 'add', 'remove', 'discard', '__setitem__'})
# The one exception, with its reason: the POSIX locks this process holds on workdirs
# are process-wide, and so is the registry of them (opening a held lock file again
# would drop its lock).
_STATE_ALLOWED = {('moma_jax/run_lock.py', '_held')}


def _mutated_globals(tree):
  """(lineno, name) of each module-level name the module changes after defining it:
  item or slice assignment, a mutating method, `del x[...]`, `global x`."""
  names = set()
  for node in tree.body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    names |= {t.id for t in targets if isinstance(t, ast.Name)}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Global):
      found += [(node.lineno, n) for n in node.names]
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
      targets = node.targets if hasattr(node, 'targets') else [node.target]
      found += [(node.lineno, t.value.id) for t in targets
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                and t.value.id in names]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr in _MUTATORS and isinstance(node.func.value, ast.Name)
          and node.func.value.id in names):
      found.append((node.lineno, node.func.value.id))
  return found


def test_no_module_changes_its_globals():
  offenders = [f'{path}:{line}: {name}' for module, path in _modules().items()
               if module.split('.')[0] == 'moma_jax'
               for line, name in _mutated_globals(_tree(path))
               if (path.replace(os.sep, '/'), name) not in _STATE_ALLOWED]
  assert not offenders, 'module-level state changed at run time:\n' + '\n'.join(offenders)


def test_global_state_finder_sees_each_kind():
  source = ('FLAGS = [False]\nTABLE = {}\nN = 0\nLOCAL = 1\n'
            'def f():\n  global N\n  FLAGS[0] = True\n  TABLE.update(a=1)\n'
            '  FLAGS[:] = []\n  x = {}\n  x["k"] = 1\n  del TABLE["a"]\n')
  found = sorted(name for _, name in _mutated_globals(ast.parse(source)))
  assert found == ['FLAGS', 'FLAGS', 'N', 'TABLE', 'TABLE']


# ----------------------------------------------------------------------------------
# Keys that cross modules are built by moma_jax/model/names.py alone, and text is
# parsed only where its format is owned or comes from outside.

_NAMES_MODULE = os.path.join('moma_jax', 'model', 'names.py')
# Prefixes of the keys names.py builds; another module writing one builds a key itself.
_KEY_PREFIXES = ('layer_', 'share/', 'eligible/', 'taken/', 'route/', 'aux_router/',
                 'batch_tokens/', 'route_stats', 'intermediates', 'balance_loss',
                 'aux_decisions')
# Modules that parse text with `re` or str.split/rsplit/partition, and what they parse.
_PARSERS = {
    'moma_jax/configs/': 'dotted field paths, tile specs, mixtures and dataset options of '
                         'the user\'s config',
    'moma_jax/renamed_fields.py': 'dotted field paths of the config',
    'moma_jax/variants.py': 'variant names of experiment files',
    'moma_jax/run_dir.py': 'OS error text of storage libraries',
    'moma_jax/cli/': 'the command line',
    'moma_jax/data/': 'dataset options, mixtures and documents the user gives',
    'moma_jax/analysis/hlo_stats.py': 'the compiler\'s HLO text',
    'moma_jax/analysis/hlo_parts.py': 'the compiler\'s HLO text and op names',
    'moma_jax/analysis/savings.py': 'file-system paths',
    'moma_jax/compilation/': 'TPU topology strings and compiler errors',
    'moma_jax/training/checks.py': 'dotted field paths of the config',
    'moma_jax/model/aux_router.py': 'the counter names it sows itself',
}


def _string_parts(tree):
  """(lineno, text) of every string constant that is not a docstring or bare comment."""
  bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare:
      yield node.lineno, node.value


def _key_literals(tree):
  return [(line, text) for line, text in _string_parts(tree)
          if text.startswith(_KEY_PREFIXES)]


def _parses_text(tree) -> list[int]:
  """Lines of `re.<fn>(...)` calls and of `x.split/rsplit/partition/rpartition(...)`
  on anything but a module (jnp.split splits arrays, aux_store.split parameter trees)."""
  modules = {a.asname or a.name.split('.')[0] for n in ast.walk(tree)
             if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      owner = node.func.value
      if isinstance(owner, ast.Name) and owner.id == 're':
        lines.append(node.lineno)
      elif node.func.attr in ('split', 'rsplit', 'partition', 'rpartition') and not (
          isinstance(owner, ast.Name) and owner.id in modules) and not (
              isinstance(owner, ast.Attribute) and owner.attr == 'path'):  # os.path
        lines.append(node.lineno)
  return lines


def test_keys_are_built_only_by_the_names_module():
  offenders = [f'{path}:{line}: {text!r}' for module, path in _modules().items()
               if module.startswith('moma_jax.') and path != _NAMES_MODULE
               for line, text in _key_literals(_tree(path))]
  assert not offenders, ('keys built outside moma_jax/model/names.py:\n' +
                         '\n'.join(offenders))


def test_text_is_parsed_only_where_its_format_is_owned():
  offenders = []
  for module, path in _modules().items():
    posix = path.replace(os.sep, '/')
    if not module.startswith('moma_jax.') or any(posix.startswith(p) for p in _PARSERS):
      continue
    offenders += [f'{posix}:{line}' for line in _parses_text(_tree(path))]
  assert not offenders, ('text parsed outside the modules that own its format (list one '
                         'in _PARSERS with what it parses, or ask names.py):\n' +
                         '\n'.join(offenders))


def test_key_and_parse_finders_see_the_old_code():
  # What moma_jax once had: a layer name split on '_', a regex over layer names, and
  # share keys built in two modules.
  old = ast.parse("import re\nimport jax.numpy as jnp\n_LAYER = re.compile(r'layer_(\\d+)')\n"
                  "def f(path, name):\n  k = f'share/{name}'\n"
                  "  return int(path.split('_')[-1]), jnp.split(path, 2)\n")
  assert [line for line, _ in _key_literals(old)] == [3, 5]
  assert _parses_text(old) == [3, 6]
