"""Command-line plumbing shared by every console script.

A script defines its own absl flags at import time, calls `define_config_flag()` and
hands its `main(config)` to `run_main`:

  CONFIG = cli.define_config_flag()
  JSON = cli.define_once(flags.DEFINE_bool, 'json', False, 'print JSON')

  def main(config):
    ...

  def run(argv=None):
    cli.run_main(main, argv, prog='moma-xxx', usage=__doc__)

`--config path/to/file.py[:ARG]` loads the file's `get_config(ARG)`; any field is
overridden as `--config.model.d_model=128` (tuples as `--config.model.experts='(2, 2)'`
or by repeating the flag). `--config.runlocal=True` then shrinks the experiment to a
CPU-sized one (`configs.shrink_for_cpu`; fields overridden on the command line stay
as given). The config is
checked with `configs.validate` before `main` runs.

Errors a user can cause (missing or unknown config file, a bad `:ARG`, an unknown flag,
a bad override value, an invalid config; `ConfigError` or `UsageError` raised by `main`)
end as one line `moma-xxx: error: <message>` on stderr and exit code 2, never a
traceback. Set MOMA_TRACEBACK=1 in the environment to see the traceback instead.
`run_main` may be called several times in one process (tests, notebooks): it forgets
the previous parse first.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Callable, NoReturn, Sequence

from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from moma_jax import configs
from moma_jax import renamed_fields
from moma_jax.cli import backends
from moma_jax.usage import UsageError

FLAGS = flags.FLAGS
CONFIG_FLAG = 'config'
_HELP_ARGS = ('-h', '--help', '-help', '--helpfull', '-?')


def define_config_flag() -> flags.FlagHolder:
  """Defines `--config FILE[:ARG]` once (scripts may share a process) and returns it."""
  if CONFIG_FLAG in FLAGS:
    return flags.FlagHolder(FLAGS, FLAGS[CONFIG_FLAG])
  return config_flags.DEFINE_config_file(
      CONFIG_FLAG, None,
      'experiment file and variant, path/to/file.py[:ARG]: loads get_config(ARG); '
      'override any field as --config.a.b=value', lock_config=True)


def define_once(define: Callable[..., flags.FlagHolder], name: str, default, help_text: str,
                **kwargs) -> flags.FlagHolder:
  """`define(name, default, help_text)` unless the flag exists: several scripts that share
  a flag name (`--workdir`, `--out`) may be imported into one process (tests, notebooks)."""
  if name in FLAGS:
    return flags.FlagHolder(FLAGS, FLAGS[name])
  return define(name, default, help_text, **kwargs)


def _chain(exc: BaseException) -> list[BaseException]:
  """exc, then what it was raised from or during, outermost first."""
  out = [exc]
  while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
    out.append(nxt)
  return out


def _one_line(exc: BaseException, argv: Sequence[str]) -> str:
  """The message of a command-line error as one line.

  absl reports a bad flag value as IllegalFlagValueError('flag --x=v: why'), which is
  the line to show. But config_flags reports a failing `get_config` as a ValueError
  whose text is a whole traceback, wrapped again by absl: there the innermost exception
  of the chain holds the user's message.
  """
  chain = _chain(exc)
  for e in chain:
    if isinstance(e, (configs.ConfigError, UsageError)):
      return str(e)
  outer, root = chain[0], chain[-1]
  if isinstance(outer, flags.Error) and 'Traceback' not in str(outer):
    return str(outer)
  if isinstance(root, (KeyError, AttributeError)):
    # Raised while config_flags defines the override flags: a field that does not exist.
    key = str(root.args[0]).strip('\'"') if root.args else ''
    names = [a.split('=', 1)[0].lstrip('-') for a in argv[1:]
             if re.match(rf'-{{1,2}}(no)?{CONFIG_FLAG}\.', a)]
    hits = [n for n in names if key in n.split('.')[1:]]
    if hits:
      return f'--{hits[0]}: no such config field {key!r}'
  # Say which --config the problem came from: absl's wrapper names it, when there is one.
  if 'Error whilst parsing config file' in str(outer):
    where = str(outer).split(': Error whilst parsing config file')[0] + ': '
  else:
    where = f'--config={_config_arg(argv)}: '
  if isinstance(root, SyntaxError):
    return f'{root.filename}:{root.lineno}: SyntaxError: {root.msg}'
  elif type(root) is ValueError:  # pylint: disable=unidiomatic-typecheck
    text = str(root)              # a message written for the user, e.g. by get_config
  elif isinstance(root, KeyError) and root.args:
    text = f'KeyError: {root.args[0]}'    # str(KeyError) is the repr of its key
  else:
    text = f'{type(root).__name__}: {root}'
  return where + text


def _config_arg(argv: Sequence[str]) -> str | None:
  """The value of `--config FILE[:ARG]` / `--config=FILE[:ARG]` in argv, if given."""
  for i, a in enumerate(argv[1:], 1):
    m = re.fullmatch(rf'-{{1,2}}{CONFIG_FLAG}(=(.*))?', a)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
  return None


def fail(prog: str, message: str) -> NoReturn:
  """Prints `prog: error: message` on one line of stderr and exits with code 2."""
  print(f'{prog}: error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(2)


def _forget_previous_parse() -> None:
  """Undoes an earlier run_main in this process: values and per-field override flags."""
  for name in list(FLAGS):
    if name.startswith(CONFIG_FLAG + '.'):
      delattr(FLAGS, name)
  FLAGS.unparse_flags()


def parse(argv: Sequence[str], prog: str) -> config_dict.ConfigDict:
  """Parses `argv` (argv[0] = program) into the validated config; exits 2 on errors."""
  argv = list(argv)
  _forget_previous_parse()
  # config_flags finds the --config.* overrides in sys.argv, not in the argv it is
  # given, so the two must agree while parsing.
  saved, absl_level = sys.argv, logging.getLogger('absl').level
  sys.argv = argv
  # config_flags logs a warning when get_config returns None, reported below instead.
  logging.getLogger('absl').setLevel(logging.ERROR)
  try:
    value = _config_arg(argv)
    if value is not None and not os.path.isfile(value.split(':', 1)[0]):
      # config_flags would defer this and report it later, in several lines.
      raise UsageError(f'--config: no such config file {value.split(":", 1)[0]!r}'
                       if value else '--config needs a value, FILE[:ARG]')
    overridden = {m.group(1) for a in argv
                  if (m := re.match(rf'-{{1,2}}{CONFIG_FLAG}\.([\w.]+)', a))}
    renamed_fields.refuse(sorted(overridden))
    with warnings.catch_warnings():
      # config_flags loads the file with importlib's deprecated load_module().
      warnings.simplefilter('ignore', DeprecationWarning)
      rest = FLAGS(argv)[1:]
    if rest:
      raise UsageError(f'unexpected argument {rest[0]!r} (flags only)')
    config = FLAGS[CONFIG_FLAG].value
    if config is None:
      raise UsageError('--config FILE[:ARG] is required' if value is None else
                       f'get_config() of --config={value} returned None')
    if not isinstance(config, config_dict.ConfigDict):
      # config_flags holds an IOError of get_config (or of loading the file) until the
      # config is first used: this raises it.
      _ = getattr(config, 'model', None)
      raise UsageError(f'get_config() of --config={FLAGS[CONFIG_FLAG].config_filename} '
                       f'returned {type(config).__name__}, not a ConfigDict')
    if config.get('runlocal'):
      configs.shrink_for_cpu(config, keep=overridden)
    return configs.validate(config)
  except Exception as e:  # pylint: disable=broad-except
    # Everything here comes from the command line or the config file it names.
    if os.environ.get('MOMA_TRACEBACK'):
      raise
    fail(prog, _one_line(e, argv))
  finally:
    sys.argv = saved
    logging.getLogger('absl').setLevel(absl_level)


def config_argument() -> str:
  """The parsed `--config` value, FILE[:ARG] (for labelling output)."""
  return FLAGS[CONFIG_FLAG].config_filename


def parse_plain(argv: Sequence[str], prog: str) -> None:
  """Parses the flags of a script without `--config`; exits 2 on errors."""
  _forget_previous_parse()
  try:
    rest = FLAGS(list(argv))[1:]
    if rest:
      raise UsageError(f'unexpected argument {rest[0]!r} (flags only)')
  except (flags.Error, UsageError) as e:
    fail(prog, str(e))


def mesh_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, int]]:
  """(argv without them, {axis: size}) of the `--config.mesh.AXIS=N` (or `... N`) flags
  of a script that reads its config from a run directory: the mesh is the one thing
  such a script lets the command line choose. UsageError for any other `--config...`
  or a size that is not an integer (the mesh itself is checked later, against the
  devices and the run: `sharding.make_mesh`)."""
  axes = tuple(configs.default_config().mesh.keys())
  rest, sizes = [argv[0]], {}
  args = iter(argv[1:])
  for a in args:
    m = re.fullmatch(rf'-{{1,2}}{CONFIG_FLAG}(\.[^=]*)?(=.*)?', a)
    if m is None:
      rest.append(a)
      continue
    name = a.split('=', 1)[0].lstrip('-')
    axis = name[len(f'{CONFIG_FLAG}.mesh.'):]
    if not name.startswith(f'{CONFIG_FLAG}.mesh.') or axis not in axes:
      raise UsageError(f'--{name}: this tool reads the config of the run directory; '
                       'only the mesh can be set: ' +
                       ', '.join(f'--{CONFIG_FLAG}.mesh.{x}=N' for x in axes))
    value = m.group(2)[1:] if m.group(2) else next(args, '')
    try:
      sizes[axis] = int(value)
    except ValueError:
      raise UsageError(f'--{name}: must be an integer (-1: the devices left over), got '
                       f'{value!r}') from None
  return rest, sizes


def run_main(main: Callable[..., object],
             argv: Sequence[str] | None = None, *, prog: str, usage: str = '',
             user_errors: tuple[type[Exception], ...] = (),
             with_config: bool = True, with_mesh: bool = False,
             host_devices: bool = True) -> None:
  """Parses the command line, validates the config and calls `main(config)`.

  argv: the full command line (argv[0] = program); None means sys.argv.
  with_config: False for a script without `--config` (e.g. one that reads a run
  directory): `main()` is called with no argument.
  with_mesh: with with_config False, the script takes `--config.mesh.AXIS=N` flags
  (`mesh_overrides`) and is called as `main({axis: N})` ({} when none is given).
  host_devices: the command runs on this host's devices (all but `moma-compile`): on a
  host with no accelerator JAX starts only the CPU (moma_jax/cli/backends.py).
  `--help` prints `usage` and the flags, and exits 0.
  user_errors: further exception types `main` raises for bad input (data, paths); like
  ConfigError they end as one line and exit code 2.
  """
  argv = list(sys.argv if argv is None else argv)
  if any(a in _HELP_ARGS for a in argv[1:]):
    # The script's own flags and --config; absl's logging flags are noise here.
    helps = [FLAGS.module_help(module) for module in FLAGS.flags_by_module_dict()
             if not module.startswith('absl')]
    print('\n\n'.join([usage.strip()] + helps).strip())
    sys.exit(0)
  if host_devices:
    backends.skip_absent_tpu()
  try:
    if with_config:
      main(parse(argv, prog))
    elif with_mesh:
      argv, sizes = mesh_overrides(argv)
      parse_plain(argv, prog)
      main(sizes)
    else:
      parse_plain(argv, prog)
      main()
  except BrokenPipeError:
    # Output piped into e.g. `head`, which stopped reading: not an error of ours.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  except (configs.ConfigError, UsageError) + tuple(user_errors) as e:
    if os.environ.get('MOMA_TRACEBACK'):
      raise
    fail(prog, str(e) if isinstance(e, tuple(user_errors)) else _one_line(e, argv))
