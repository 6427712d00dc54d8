"""What the benchmarks share: the machine's description, child processes, alternation, medians.

Every measurement runs in a process of its own (JAX's CPU device count and XLA flags are fixed
when JAX starts, and two frameworks in one process slow each other down: ../PERF-NOTES.md), and
the settings being compared alternate (A B A B ...) so that the load of a shared machine hits
them alike. A child prints one JSON object as its last line of output.
"""

import ast
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
PEER_ENV = 'DDPM_PEER_PYTHON'
DEFAULT_PEER = REPO / 'benchmarks' / '.venv-peer' / 'bin' / 'python'


def machine() -> str:
  """CPU model, cores, memory and the load average now: the line every table is headed by."""
  model = platform.processor() or 'unknown CPU'
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
    kb = int(pathlib.Path('/proc/meminfo').read_text().split()[1])
    memory = f'{kb / 2**20:.0f} GiB'
  except OSError:
    memory = '? GiB'
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  return f'{model}, {os.cpu_count()} cores, {memory}; load average {load}'


def load_average() -> float:
  """The 1-minute load average: above the core count, other processes share the cores."""
  return os.getloadavg()[0]


def peer_python(flag_value: str | None) -> str | None:
  """The peer's Python: the flag, else $DDPM_PEER_PYTHON, else benchmarks/.venv-peer if it
  exists; None if none is set up (the peer is optional)."""
  for candidate in (flag_value, os.environ.get(PEER_ENV), DEFAULT_PEER):
    if candidate and pathlib.Path(candidate).exists():
      return str(candidate)
  return None


def child_env(xla_flags: str = '', extra: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of a JAX child: quiet TensorFlow, CPU only, the given XLA flags only."""
  dropped = ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'JAX_COMPILATION_CACHE_DIR')
  env = {k: v for k, v in os.environ.items() if k not in dropped}
  env.update(TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  env.update(extra or {})
  return env


def peer_env(**extra: str) -> dict[str, str]:
  """The environment of a peer child with ``extra`` variables set."""
  return {**os.environ, **extra}


def run_json(command: Sequence[str], env: Mapping[str, str] | None = None, timeout=3600) -> dict:
  """Runs ``command`` from the repository root and returns the JSON object its output ends with."""
  proc = subprocess.run(
    list(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  if proc.returncode:
    raise RuntimeError(
      f'{" ".join(command)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}'
    )
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result['load'] = load_average()
  return result


def module_command(module: str, *args: str) -> list[str]:
  """``python -m benchmarks.<module> args`` with this interpreter."""
  return [sys.executable, '-m', f'benchmarks.{module}', *args]


def alternate(
  commands: Mapping[str, tuple[Sequence[str], Mapping[str, str] | None]],
  repeats: int,
  log=print,
) -> dict[str, list[dict]]:
  """Runs each named (command, env) ``repeats`` times, alternating A B A B; results by name."""
  results = {name: [] for name in commands}
  for repeat in range(repeats):
    for name, (command, env) in commands.items():
      result = run_json(command, env)
      results[name].append(result)
      log(
        f'  [{repeat + 1}/{repeats}] {name}: {result["seconds"]:.4g} s (load {result["load"]:.1f})',
        file=sys.stderr,
      )
  return results


def median(results: Sequence[Mapping], key: str = 'seconds') -> float:
  return statistics.median(r[key] for r in results)


def runs(results: Sequence[Mapping], key: str = 'seconds', fmt: str = '{:.3g}') -> str:
  return ', '.join(fmt.format(r[key]) for r in results)


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def emit(result: Mapping) -> None:
  """A child's last line: its result as JSON."""
  print(json.dumps(result), flush=True)


def load_config(name: str, overrides=()):
  """configs/<name>.py with ``a.b=value`` overrides applied."""
  from diffusion_jax import config_defaults

  config = config_defaults.load(str(CONFIGS / f'{name}.py'))
  for item in overrides:
    path, _, value = item.partition('=')
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config
