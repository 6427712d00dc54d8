"""Diagnosis of a command line that does not parse: an unknown or mistyped flag or config field,
a missing or broken config file, as one paragraph (what is wrong, the nearest names, the fix) and
exit status 2, instead of absl's and ml_collections' tracebacks.

The config file is loaded a second time only to name fields and their types in the message: the
flag that failed to parse holds no config then.
"""

import difflib
import pathlib
import re
from collections.abc import Sequence

import ml_collections
from absl import flags

from diffusion_jax import config_defaults
from diffusion_jax.errors import fail

CONFIG_FLAG = 'config'


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s flags parser: a mistake on the command line (an unknown or mistyped flag or
  config field, a missing or broken config file) is one paragraph and exit status 2."""
  try:
    remaining = flags.FLAGS(argv)
    if CONFIG_FLAG in flags.FLAGS and flags.FLAGS[CONFIG_FLAG].value is not None:
      flags.FLAGS[CONFIG_FLAG].value.keys()  # a file that failed to load raises its error here
    return remaining
  except (flags.Error, AttributeError, KeyError, OSError, SyntaxError) as e:
    if _asks_for_traceback(argv):
      raise
    fail(_describe(e, argv))


def _asks_for_traceback(argv: Sequence[str]) -> bool:
  """``traceback_asked`` from the raw arguments, for flags that could not be parsed."""
  for arg in argv[1:]:
    name, has_value, value = arg.lstrip('-').partition('=')
    if name == 'debug' and value.lower() in ('', 'true', '1'):
      return True
    if name in ('verbosity', 'v') and has_value and re.fullmatch(r'\d+', value) and int(value):
      return True
  return False


def _describe(error: Exception, argv: Sequence[str]) -> str:
  """One paragraph on a command-line error raised while the flags were parsed."""
  spec = _flag_value(argv, CONFIG_FLAG)
  if isinstance(error, OSError):
    return _config_file_problem(spec, error)
  if isinstance(error, SyntaxError):
    return (
      f'--config={spec}: the config file is not valid Python: {error.msg} ({error.filename}, '
      f'line {error.lineno}).'
    )
  if isinstance(error, (AttributeError, KeyError)):
    return _unknown_field(argv, spec) or f'--config={spec}: {error}'
  text = str(error).removeprefix('flag ')
  if 'Traceback (most recent call last)' in text:  # config_flags embeds a config file's traceback
    head = text.split('Error whilst parsing config file')[0]
    return f'{head}the config file failed: {text.strip().splitlines()[-1]}'
  field = re.match(rf'--{CONFIG_FLAG}\.([\w.]+)=', text)
  current = _config_value(spec, field[1]) if field else None
  if current is not None:
    text += f'; {field[1]} takes {_a(current)} (the config has {current!r})'
  return f'{text} (--helpshort lists the flags).'


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The last value given to ``--name`` (``--name=v`` or ``--name v``) in ``argv``."""
  value = None
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf'--?{name}(=(.*))?', arg)
    if match:
      value = match[2] if match[1] else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _config_file_problem(spec: str | None, error: OSError) -> str:
  """What is wrong with the config file ``spec`` (``path`` or ``path:variant``)."""
  path = pathlib.Path((spec or '').partition(':')[0])
  if path.exists():
    return f'--config={spec}: cannot read {path}: {error.__cause__ or error}'
  folder = next(p for p in (path.parent, *path.absolute().parents) if p.is_dir())
  choices = sorted(str(p) for p in folder.glob('*.py'))
  near = difflib.get_close_matches(path.stem, [pathlib.Path(c).stem for c in choices], n=1)
  hint = f' Did you mean {folder / near[0]}.py?' if near else ''
  listing = f' Config files there: {", ".join(choices)}.' if choices else ''
  return (
    f'--config={spec}: there is no file {path} (relative paths start from the current '
    f'directory, {pathlib.Path.cwd()}).{hint}{listing}'
  )


def _load(spec: str | None) -> ml_collections.ConfigDict | None:
  """The config file ``spec`` loaded again (None if it fails now: then there is no hint)."""
  try:
    return config_defaults.load(spec or '')
  except Exception:
    return None


def _config_value(spec: str | None, path: str) -> object:
  """The value of the dotted ``path`` in the config file ``spec`` (None if there is none)."""
  node = _load(spec)
  for part in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def _unknown_field(argv: Sequence[str], spec: str | None) -> str | None:
  """Which ``--config.a.b=v`` override names no field of the config, with the nearest names."""
  config = _load(spec)
  if config is None:
    return None
  leaves = _paths(config)
  for arg in argv[1:]:
    match = re.match(rf'--?(?:no)?{CONFIG_FLAG}\.([^=]+)', arg)
    if not match:
      continue
    path, node, walked = match[1], config, []
    for part in path.split('.'):
      if not isinstance(node, ml_collections.ConfigDict):
        return f'{arg}: {".".join(walked)} is {_a(node)}, not a section ({spec}).'
      if part not in node:
        section = '.'.join([CONFIG_FLAG, *walked])
        near = [f'{section}.{name}' for name in difflib.get_close_matches(part, list(node))]
        near += [f'{CONFIG_FLAG}.{p}' for p in leaves if p.endswith(f'.{path}')]
        near = list(dict.fromkeys(near))
        hint = f' Did you mean --{" or --".join(near)}?' if near else ''
        return (
          f'{arg}: the config has no field {path!r} ({spec}).{hint} Fields under {section}: '
          f'{", ".join(node)}.'
        )
      node = node[part]
      walked.append(part)
  return None


def _paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every field of ``config`` as a dotted path (``model.ch``)."""
  paths = []
  for key, value in config.items():
    paths.append(f'{prefix}{key}')
    if isinstance(value, ml_collections.ConfigDict):
      paths += _paths(value, f'{prefix}{key}.')
  return paths


def _a(value: object) -> str:
  """``'an int'``, ``'a float'``: the type of ``value`` with its article."""
  kind = type(value).__name__
  return f'{"an" if kind[0] in "aeiou" else "a"} {kind}'
