"""launch/tpu.sh against stand-ins: the gcloud commands it makes (a fake ``gcloud`` records its
argv) and its remote scripts, run here under bash with a fake home, trainer, ``uv`` and ``sudo``.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'tpu.sh'
ZONE = 'us-central1-a'
TUPLE = '--config.model.ch_mult=(1,1,2,2,4,4)'
# The launcher's settings in the environment: the tests' own environment must not set them.
SETTINGS = {
  'TPU_NAME',
  'ZONE',
  'PROJECT',
  'PYTHON_VERSION',
  'LOG_SYNC_SECONDS',
  'START_CHECK_SECONDS',
  'TPU_INTERNAL_IP',
  'TPU_TUNNEL_THROUGH_IAP',
  'WATCH_POLL_SECONDS',
  'WATCH_MAX_RESTARTS',
  'WATCH_LOG',
}

# Every stand-in is this one program under another name: it appends [name, *argv] to $FAKE_LOG.
RECORDER = f"""#!{sys.executable}
import json, os, pathlib, shutil, sys
name, argv = pathlib.Path(sys.argv[0]).name, sys.argv[1:]
log = pathlib.Path(os.environ['FAKE_LOG'])
with log.open('a') as f:
  f.write(json.dumps([name, *argv]) + '\\n')
if name == 'gcloud' and argv[:4] == ['compute', 'tpus', 'tpu-vm', 'scp']:
  shutil.copy(argv[4], log.parent / 'pushed.tar.gz')
if name == 'gcloud' and argv[3:4] == ['describe']:
  print('state: READY')
if name == 'uv' and argv[:1] == ['venv']:
  python = pathlib.Path(argv[-1], 'bin', 'python')
  python.parent.mkdir(parents=True)
  python.symlink_to(
    os.environ.get('FAKE_VENV_PYTHON') or pathlib.Path(sys.argv[0]).with_name('python')
  )
if name == 'hostname':
  print(os.environ['FAKE_HOSTNAME'])
if name == 'pgrep':
  sys.exit(1)
if name == 'gcloud' and argv[:2] == ['storage', 'cp'] and os.environ.get('FAKE_STORAGE_ERROR'):
  sys.exit(os.environ['FAKE_STORAGE_ERROR'])  # to stderr, status 1
if name == 'gcloud' and argv[:3] == ['config', 'get-value', 'account']:
  print('tpu-sa@p.iam.gserviceaccount.com')
if name == 'sudo' and argv[:2] == ['lsof', '-t']:
  print(os.environ.get('FAKE_TPU_HOLDERS', ''))
if name == 'python3' and argv[:1] and argv[0].endswith('accelerator.py'):
  # The real program, with the device files /dev/... looked up in $FAKE_DEV.
  import glob, runpy
  dev, real_glob = os.environ.get('FAKE_DEV', '/nonexistent'), glob.glob
  glob.glob = lambda p: [
    '/dev/' + os.path.relpath(f, dev) for f in real_glob(p.replace('/dev', dev, 1))
  ]
  sys.argv = argv
  runpy.run_path(argv[0], run_name='__main__')
"""

# The trainer: .venv/bin/python of the fake worker. Records its argv, environment and folder,
# prints a line, and with FAKE_TRAINER_WAIT waits for SIGTERM (at most 30 s), as a run does, or
# for the file $FAKE_TRAINER_FINISH: then it ends as a complete run does, or fails with the
# status written there. FAKE_TRAINER_EXIT=N: fails at once with status N instead.
TRAINER = f"""#!{sys.executable}
import json, os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
record = {{
  'argv': sys.argv[1:],
  'cwd': os.getcwd(),
  'env': {{k: os.environ.get(k) for k in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL')}},
}}
with open(os.environ['FAKE_TRAINER_OUT'], 'w') as f:
  json.dump(record, f)
if os.environ.get('FAKE_TRAINER_EXIT'):
  print('error: --config.bogus: no such setting', flush=True)
  sys.exit(int(os.environ['FAKE_TRAINER_EXIT']))
print('step 1, loss 0.5', flush=True)
if os.environ.get('FAKE_TRAINER_WAIT'):
  finish = os.environ.get('FAKE_TRAINER_FINISH', '/nonexistent')
  deadline = time.time() + 30
  while not stop and not os.path.exists(finish) and time.time() < deadline:
    time.sleep(0.05)
  if os.path.exists(finish):
    status = int(open(finish).read() or 0)
    print('error: training diverged' if status else '12:00:00  Done: step 4 in w', flush=True)
    sys.exit(status)
  print('SIGTERM: saved a checkpoint' if stop else 'no SIGTERM', flush=True)
"""


def write_program(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def split_words(line: str) -> list[str]:
  """The arguments bash reads from one shell-quoted line (``printf %q`` output)."""
  out = subprocess.run(
    ['bash', '-c', "printf '%s\\0' " + line], capture_output=True, text=True, check=True
  ).stdout
  return out.split('\0')[:-1]


def command_of(call: list[str]) -> str:
  """The remote script of a recorded ``gcloud compute tpus tpu-vm ssh`` call."""
  assert call[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], call
  (command,) = [a.removeprefix('--command=') for a in call if a.startswith('--command=')]
  subprocess.run(['bash', '-n', '-c', command], check=True)
  return command


def wait_for(predicate, timeout: float = 15) -> None:
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


class Laptop:
  """launch/tpu.sh run as documented (the program itself, not through bash) with the fake gcloud
  first on PATH; ``calls()`` is what gcloud got."""

  def __init__(self, tmp_path: pathlib.Path, script: pathlib.Path = SCRIPT):
    self.script = script
    self.bin = tmp_path / 'bin'
    for name in ('gcloud', 'uv', 'python3', 'sudo', 'pgrep'):
      write_program(self.bin / name, RECORDER)
    write_program(self.bin / 'python', RECORDER)  # the venv python that the fake uv makes
    self.log = tmp_path / 'gcloud.jsonl'
    self.background: list[subprocess.Popen] = []
    self.env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    self.env.update(PATH=f'{self.bin}{os.pathsep}{os.environ["PATH"]}', FAKE_LOG=str(self.log))

  def run(self, *args: str, code: int = 0, env: dict | None = None, cwd=None):
    proc = subprocess.run(
      [str(self.script), *args],
      env={**self.env, **(env or {})},
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    return proc

  def tpu(self, *args: str, **kwargs):
    return self.run('--tpu', 't', '--zone', ZONE, *args, **kwargs)

  def start(self, *args: str, out: pathlib.Path, env: dict | None = None) -> subprocess.Popen:
    """``tpu(*args)`` in the background (its own process group, in ``background``), its stdout
    and stderr to ``out``."""
    with out.open('w') as f:
      proc = subprocess.Popen(
        [str(self.script), '--tpu', 't', '--zone', ZONE, *args],
        env={**self.env, **(env or {})},
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    self.background.append(proc)
    return proc

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    calls = [json.loads(line) for line in self.log.read_text().splitlines()]
    self.log.unlink()
    return calls


class Worker:
  """A TPU VM worker: a home folder where the recorded remote scripts run under bash."""

  def __init__(self, tmp_path: pathlib.Path, laptop: Laptop):
    self.home = tmp_path / 'home'
    self.code = self.home / 'diffusion_jax'
    self.code.mkdir(parents=True)
    self.log = tmp_path / 'worker.jsonl'
    self.trainer_out = tmp_path / 'trainer.json'
    self.env = {
      'PATH': laptop.env['PATH'],
      'HOME': str(self.home),
      'FAKE_LOG': str(self.log),
      'FAKE_TRAINER_OUT': str(self.trainer_out),
    }

  def run(self, command: str, code: int = 0, env: dict | None = None):
    proc = subprocess.run(
      ['bash', '-c', command],
      env={**self.env, **(env or {})},
      cwd=self.home,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    return proc

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def train_log(self) -> pathlib.Path:
    (log,) = (self.code / 'logs').glob('train_*.log')
    return log


@pytest.fixture
def laptop(tmp_path):
  return Laptop(tmp_path)


@pytest.fixture
def worker(tmp_path, laptop):
  worker = Worker(tmp_path, laptop)
  yield worker
  pidfile = worker.code / 'logs' / 'train.pid'
  if pidfile.exists():  # a test failed with its run still going
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


@pytest.fixture
def repo(tmp_path):
  """A git checkout with launch/tpu.sh, requirements.txt and a module, all committed."""
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  shutil.copy(SCRIPT, repo / 'launch' / 'tpu.sh')
  shutil.copy(REPO / 'requirements.txt', repo / 'requirements.txt')
  (repo / 'pkg.py').write_text('VERSION = 1\n')
  commit_all(repo)
  return repo


def git(repo: pathlib.Path, *args: str) -> None:
  subprocess.run(
    ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
    + ['-c', 'commit.gpgsign=false', *args],
    check=True,
  )


def commit_all(repo: pathlib.Path) -> None:
  """``repo`` made a git checkout whose one commit holds all its files."""
  git(repo, 'init', '-q')
  git(repo, 'add', '.')
  git(repo, 'commit', '-q', '-m', 'c')


def git_show(repo: pathlib.Path, what: str) -> str:
  return subprocess.run(
    ['git', '-C', str(repo), 'show', what], capture_output=True, text=True, check=True
  ).stdout


def head(repo: pathlib.Path) -> str:
  return subprocess.run(
    ['git', '-C', str(repo), 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True
  ).stdout.strip()


@pytest.mark.parametrize('script', sorted((REPO / 'launch').glob('*.sh')), ids=lambda p: p.name)
def test_every_launch_script_runs_as_a_program(script):
  """``launch/NAME.sh`` as the docs write it: executable (on disk and in git), bash, valid syntax.
  (The others do heavy work when run; tpu.sh runs directly in every test here, through Laptop.)"""
  assert os.access(script, os.X_OK)
  assert script.read_text().startswith('#!/usr/bin/env bash\n')
  subprocess.run(['bash', '-n', str(script)], check=True)
  staged = subprocess.run(
    ['git', '-C', str(REPO), 'ls-files', '--stage', '--', str(script.relative_to(REPO))],
    capture_output=True,
    text=True,
  ).stdout
  assert not staged or staged.startswith('100755 '), staged  # tracked: with its x bit


def test_help_lists_every_command(laptop):
  out = laptop.run('--help').stdout
  assert out.startswith('Trains diffusion_jax on a Cloud TPU VM')
  commands = ('plan', 'create', 'push', 'setup', 'train', 'logs', 'status', 'stop', 'delete')
  for command in (*commands, 'watch'):
    assert f'\n  {command}' in out
  assert laptop.run('train', '--help').stdout == out  # no TPU name needed for help
  assert laptop.calls() == []


@pytest.mark.parametrize(
  'args, words',
  [
    (['--zone', ZONE], ['--tpu', 'TPU_NAME']),
    (['--tpu', 't'], ['--zone', 'ZONE']),
  ],
)
def test_a_missing_tpu_or_zone_is_a_usage_error(laptop, args, words):
  err = laptop.run(*args, 'create', '--accelerator-type', 'v3-8', code=2).stderr
  assert len(err.strip().splitlines()) == 1
  assert all(word in err for word in words)
  assert laptop.calls() == []


@pytest.mark.parametrize(
  'args', [['--bogus', 'status'], ['frobnicate'], [], ['create'], ['train', 'configs/x.py']]
)
def test_other_usage_errors_exit_2(laptop, args):
  laptop.tpu(*args, code=2)
  assert laptop.calls() == []


def test_the_global_options_come_from_the_environment(laptop):
  laptop.run('delete', env={'TPU_NAME': 'e', 'ZONE': 'europe-west4-a', 'PROJECT': 'p'})
  assert laptop.calls() == [
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'e', '--zone=europe-west4-a', '--project=p']
    + ['--quiet']
  ]


VM = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 't', f'--zone={ZONE}']
QUEUED = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 't', f'--zone={ZONE}']
BASE = 'tpu-ubuntu2204-base'  # the default runtime of v2, v3 and v4


@pytest.mark.parametrize(
  'args, call',
  [
    (['v3-8'], VM + ['--accelerator-type=v3-8', f'--version={BASE}']),
    (['v4-32', '--spot'], VM + ['--accelerator-type=v4-32', f'--version={BASE}', '--spot']),
    (['v5litepod-16'], VM + ['--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite']),
    (['v6e-8'], VM + ['--accelerator-type=v6e-8', '--version=v2-alpha-tpuv6e']),
    (['v4-8', '--version', 'r1'], VM + ['--accelerator-type=v4-8', '--version=r1']),
    (
      ['v3-8', '--', '--network=n'],
      VM + ['--accelerator-type=v3-8', f'--version={BASE}', '--network=n'],
    ),
    (
      ['v4-32', '--queued', '--spot'],
      QUEUED + ['--node-id=t', '--accelerator-type=v4-32', f'--runtime-version={BASE}', '--spot'],
    ),
  ],
)
def test_create(laptop, args, call):
  laptop.tpu('create', '--accelerator-type', *args)
  assert laptop.calls() == [call]


def test_create_of_an_unknown_generation_needs_a_version(laptop):
  assert '--version' in laptop.tpu('create', '--accelerator-type', 'v9-8', code=2).stderr


def test_plan_compiles_on_this_machine_without_a_tpu_name(laptop, tmp_path):
  """``plan`` needs neither --tpu nor --zone, sets up the venv with the TPU runtime, then runs
  the compile check (covered by tests/test_tpu_plan.py) with the overrides as they are."""
  env = {'TPU_NAME': '', 'ZONE': ''}
  lines = laptop.run('--dry-run', 'plan', 'v4-32', 'configs/cifar10.py:x', TUPLE, env=env).stdout
  setup, compile_ = (split_words(line) for line in lines.splitlines())
  assert setup == ['env', 'WITH_TPU=1', 'bash', str(REPO / 'launch' / 'setup.sh')]
  assert compile_ == [
    '.venv/bin/python',
    '-m',
    'benchmarks.tpu_compile',
    '--tpu=v4-32',
    f'--config={REPO / "configs" / "cifar10.py"}:x',
    '--fit',
    TUPLE,
  ]
  assert laptop.calls() == []
  err = laptop.run('plan', 'v3-8', str(tmp_path / 'nope.py'), code=2, env=env).stderr
  assert 'no config file' in err
  assert (
    'plan v3-8 CONFIG' in laptop.tpu('--dry-run', 'create', '--accelerator-type', 'v3-8').stderr
  )


def test_create_of_a_tpu7x_points_to_gke(laptop):
  err = laptop.tpu('create', '--accelerator-type', 'tpu7x-8', code=2).stderr
  assert 'Cloud TPU API' in err and 'GKE' in err and 'docs/cloud_tpu.md' in err
  assert laptop.calls() == []


@pytest.mark.parametrize(
  'args, call',
  [
    ([], ['tpu-vm', 'delete', 't', f'--zone={ZONE}', '--quiet']),
    (['--queued'], ['queued-resources', 'delete', 't', f'--zone={ZONE}', '--force', '--quiet']),
  ],
)
def test_delete(laptop, args, call):
  laptop.run('--project', 'p', '--tpu', 't', '--zone', ZONE, 'delete', *args)
  assert laptop.calls() == [['gcloud', 'compute', 'tpus', *call[:4], '--project=p', *call[4:]]]


def test_push_sends_the_commit_to_every_worker(tmp_path, repo, worker):
  laptop = Laptop(tmp_path, repo / 'launch' / 'tpu.sh')
  laptop.tpu('push', cwd=tmp_path)
  scp, ssh = laptop.calls()
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[6:] == ['t:~/diffusion_jax.tar.gz', '--worker=all', f'--zone={ZONE}']
  assert not os.path.exists(scp[5])  # the temporary archive is gone
  assert ssh[5:8] == ['t', f'--zone={ZONE}', '--worker=all']
  # The worker: old code to replace, a venv and logs to keep.
  for path in ('old.py', '.venv/bin/python', 'logs/train_w.log'):
    (worker.code / path).parent.mkdir(parents=True, exist_ok=True)
    (worker.code / path).write_text('old')
  shutil.copy(tmp_path / 'pushed.tar.gz', worker.home / 'diffusion_jax.tar.gz')
  worker.run(command_of(ssh))
  assert not (worker.code / 'old.py').exists()
  assert (worker.code / '.venv/bin/python').read_text() == 'old'
  assert (worker.code / 'logs/train_w.log').read_text() == 'old'
  assert (worker.code / 'pkg.py').read_text() == 'VERSION = 1\n'
  assert (worker.code / 'launch/tpu.sh').exists()
  assert (worker.code / 'COMMIT').read_text() == head(repo) + '\n'
  assert not (worker.home / 'diffusion_jax.tar.gz').exists()


def test_push_refuses_uncommitted_changes(tmp_path, repo):
  laptop = Laptop(tmp_path, repo / 'launch' / 'tpu.sh')
  (repo / 'pkg.py').write_text('VERSION = 2\n')
  err = laptop.tpu('push', code=2).stderr
  assert 'uncommitted' in err and '--allow-dirty' in err
  assert laptop.calls() == []
  err = laptop.tpu('push', '--allow-dirty').stderr
  assert f'only commit {head(repo)}' in err
  assert len(laptop.calls()) == 2
  with tarfile.open(tmp_path / 'pushed.tar.gz') as tar:
    assert tar.extractfile('pkg.py').read() == b'VERSION = 1\n'


@pytest.mark.parametrize(
  ('python', 'lock'), [(None, 'requirements.txt'), ('3.11', 'requirements-py311.txt')]
)
def test_setup_makes_a_venv_of_the_lock_with_the_tpu_runtime(laptop, worker, python, lock):
  env = {'PYTHON_VERSION': python} if python else {}
  python = python or '3.13'  # the main line
  laptop.tpu('setup', env=env)
  (call,) = laptop.calls()
  assert call[5:8] == ['t', f'--zone={ZONE}', '--worker=all']
  command = command_of(call)
  assert not re.search(
    r'--find-links|\s-f\s+\S*https?:|libtpu_releases|storage\.googleapis', command
  )
  assert re.search(r'^libtpu==', (REPO / lock).read_text(), re.M)  # the lock has the TPU runtime
  (worker.code / lock).write_text(git_show(REPO, f'HEAD:{lock}'))  # what push sends
  worker.run(command)
  uv = ['uv', 'pip', 'install', '--python', '.venv/bin/python', '--quiet']
  assert [c for c in worker.calls() if c[0] != 'python'] == [
    ['python3', '-m', 'pip', 'install', '--user', '--quiet', '--upgrade', 'uv'],
    ['uv', 'python', 'install', python],
    ['uv', 'venv', '--python', python, '.venv'],
    uv + ['-r', lock],
    uv + ['--no-deps', '-e', '.'],
  ]
  worker.log.unlink()
  worker.run(command)  # again: the venv stays
  assert ['uv', 'venv', '--python', python, '.venv'] not in worker.calls()
  # Code pushed with another lock than the local checkout's: push first.
  (worker.code / lock).write_text('jax==0.0.1\n')
  assert 'push' in worker.run(command, code=1).stderr


def test_push_and_setup_of_another_commit(tmp_path, repo, worker):
  laptop = Laptop(tmp_path, repo / 'launch' / 'tpu.sh')
  first = head(repo)
  (repo / 'requirements.txt').write_text('jax==0.0.1\n')
  git(repo, 'commit', '-q', '-am', 'another lock')
  (repo / 'pkg.py').write_text('VERSION = 3\n')  # uncommitted: --commit does not look
  laptop.tpu('push', '--commit', first[:8])
  _, ssh = laptop.calls()
  assert f'\ncommit={first}\n' in command_of(ssh)
  with tarfile.open(tmp_path / 'pushed.tar.gz') as tar:
    assert tar.extractfile('requirements.txt').read() == (REPO / 'requirements.txt').read_bytes()
  for args, commit in ([], head(repo)), (['--commit', first], first):
    laptop.tpu('setup', *args)
    (ssh,) = laptop.calls()
    lock_sum = hashlib.sha1(git_show(repo, f'{commit}:requirements.txt').encode()).hexdigest()
    assert f'\ncommit={commit}\nlock=requirements.txt\nlock_sum={lock_sum}\n' in command_of(ssh)
  assert 'no commit nope' in laptop.tpu('push', '--commit', 'nope', code=1).stderr


def test_setup_refuses_an_unsupported_python(laptop):
  assert '3.11, 3.12 and 3.13' in laptop.tpu('setup', env={'PYTHON_VERSION': '3.10'}, code=2).stderr
  assert laptop.calls() == []


def start_training(laptop, worker, workdir, *flags, env=None, code=0):
  """launch/tpu.sh train on the fake worker, checking the start for 1 s; returns the remote
  command and what it printed."""
  env = {'START_CHECK_SECONDS': '1', **(env or {})}
  write_program(worker.code / '.venv/bin/python', TRAINER)
  (worker.code / 'COMMIT').write_text('abc123\n')
  laptop.tpu('train', 'configs/cifar10.py', str(workdir), *flags, env=env)
  (call,) = laptop.calls()
  assert call[5:8] == ['t', f'--zone={ZONE}', '--worker=all']
  command = command_of(call)
  started = time.time()
  proc = worker.run(command, env=env, code=code)
  assert time.time() - started < 10  # detached: the ssh session does not wait for the run
  wait_for(worker.trainer_out.exists)
  return command, proc.stdout + proc.stderr


def test_train_passes_every_argument_unchanged(tmp_path, laptop, worker):
  workdir = tmp_path / 'work dir'
  flags = [TUPLE, f'--config.dataset.data_dir={tmp_path}/tf ds $HOME', "--config.name=it's"]
  _, out = start_training(laptop, worker, workdir, *flags)
  assert 'the run ended at once, with exit status 0' in out
  pidfile = worker.code / 'logs' / 'train.pid'
  wait_for(lambda: not pidfile.exists())
  record = json.loads(worker.trainer_out.read_text())
  assert record['argv'] == [
    '-m',
    'diffusion_jax.main',
    '--config=configs/cifar10.py',
    f'--workdir={workdir}',
    '--distributed',
    f'--jax_compilation_cache_dir={workdir}/jax_cache',
    *flags,
  ]
  assert record['env'] == {'JAX_PLATFORMS': 'tpu', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  assert record['cwd'] == str(worker.code)
  log = worker.train_log().read_text()
  assert 'commit abc123' in log and 'step 1, loss 0.5' in log and 'exit status 0' in log
  assert (workdir / 'logs' / worker.train_log().name).read_text() == log  # the copy at exit
  # logs: the tail of worker 0's log; --worker all --follow: every worker, following.
  laptop.tpu('logs')
  (call,) = laptop.calls()
  assert '--worker=0' in call
  assert 'step 1, loss 0.5' in worker.run(command_of(call)).stdout
  laptop.tpu('logs', '--worker', 'all', '--follow', '--lines', '7')
  (call,) = laptop.calls()
  assert '--worker=all' in call and '\nfollow=-F\n' in command_of(call)


def test_stop_ends_a_detached_run_and_frees_the_tpu(tmp_path, laptop, worker):
  workdir = tmp_path / 'work'
  env = {'FAKE_TRAINER_WAIT': '1', 'LOG_SYNC_SECONDS': '1'}
  command, out = start_training(laptop, worker, workdir, env=env)
  assert 'training in the background' in out
  pidfile = worker.code / 'logs' / 'train.pid'
  wait_for(pidfile.exists)
  group = int(pidfile.read_text())
  os.killpg(group, 0)  # running
  copy = workdir / 'logs' / worker.train_log().name
  wait_for(lambda: copy.exists() and 'step 1' in copy.read_text())  # the periodic copy
  assert 'in progress' in worker.run(command, code=1, env=env).stderr  # one run at a time
  # status: describe, then every worker's state.
  laptop.tpu('status')
  describe, ssh = laptop.calls()
  assert describe[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 't', f'--zone={ZONE}']
  assert ssh[7] == '--worker=all'
  assert ': code: commit abc123' in worker.run(command_of(ssh)).stdout
  laptop.tpu('stop', '--grace', '20')
  (call,) = laptop.calls()
  assert call[7] == '--worker=all'
  out = worker.run(command_of(call)).stdout
  assert 'SIGTERM' in out and 'TPU free' in out
  with pytest.raises(ProcessLookupError):
    os.killpg(group, 0)
  assert not pidfile.exists()
  log = worker.train_log().read_text()
  assert 'SIGTERM: saved a checkpoint' in log and 'exit status 0' in log
  assert copy.read_text() == log
  assert ['sudo', 'rm', '-f', '/tmp/libtpu_lockfile'] in worker.calls()


@pytest.mark.parametrize('pushed', [True, False])
def test_stop_kills_the_holders_of_the_chips_that_accelerator_py_lists(
  tmp_path, laptop, worker, pushed
):
  dev = tmp_path / 'dev'
  for name in ('accel0', 'accel1', 'vfio/0', 'vfio/vfio', 'nvidia0'):
    (dev / name).parent.mkdir(parents=True, exist_ok=True)
    (dev / name).touch()
  if pushed:  # the code on the worker has the helper
    (worker.code / 'diffusion_jax').mkdir()
    shutil.copy(REPO / 'diffusion_jax' / 'accelerator.py', worker.code / 'diffusion_jax')
  laptop.tpu('stop')
  (call,) = laptop.calls()
  out = worker.run(command_of(call), env={'FAKE_DEV': str(dev), 'FAKE_TPU_HOLDERS': '41 42'}).stdout
  assert 'TPU free' in out
  helper = ['python3', f'{worker.code}/diffusion_jax/accelerator.py', '--tpu-chips']
  sudo = [c for c in worker.calls() if c[0] == 'sudo']
  assert helper in worker.calls()
  if pushed:
    assert sudo[:2] == [
      ['sudo', 'lsof', '-t', '/dev/accel0', '/dev/accel1', '/dev/vfio/0'],
      ['sudo', 'kill', '-KILL', '41', '42'],
    ]
  assert sudo[-1] == ['sudo', 'rm', '-f', '/tmp/libtpu_lockfile']
  assert len(sudo) == (3 if pushed else 1)


def test_train_fails_with_the_end_of_the_log_when_the_run_fails_at_start(tmp_path, laptop, worker):
  _, err = start_training(laptop, worker, tmp_path, env={'FAKE_TRAINER_EXIT': '2'}, code=1)
  assert 'the run ended at once, with exit status 2' in err
  assert 'error: --config.bogus: no such setting' in err  # the trainer's last words


def test_a_log_copy_that_fails_is_reported_once_with_the_fix(laptop, worker):
  env = {
    'FAKE_TRAINER_WAIT': '1',
    'LOG_SYNC_SECONDS': '1',
    'FAKE_STORAGE_ERROR': 'ERROR: (gcloud.storage.cp) HTTPError 403: tpu-sa@p.iam.gserviceaccount'
    '.com does not have storage.objects.create access to the Google Cloud Storage object.',
  }
  start_training(laptop, worker, 'gs://b/run 1', env=env)

  def copies():
    return [c for c in worker.calls() if c[:3] == ['gcloud', 'storage', 'cp']]

  wait_for(lambda: len(copies()) >= 3)  # every second: all fail
  laptop.tpu('stop', '--grace', '20')
  worker.run(command_of(laptop.calls()[0]))
  assert copies()[-1][4:] == [
    str(worker.train_log()),
    'gs://b/run 1/logs/' + worker.train_log().name,
  ]
  log = worker.train_log().read_text()
  report = [line for line in log.splitlines() if line.startswith('=== log copy: ')]
  assert report == [
    '=== log copy: FAILED, this log cannot be copied to gs://b/run 1/logs/'
    f'{worker.train_log().name} (reported once):',
    f'=== log copy:   {env["FAKE_STORAGE_ERROR"]}',
    "=== log copy: fix: let the VM's service account write the bucket (docs/cloud_tpu.md, "
    'section 3):',
    '=== log copy:   gcloud storage buckets add-iam-policy-binding gs://b '
    '--member=serviceAccount:tpu-sa@p.iam.gserviceaccount.com --role=roles/storage.objectAdmin',
  ]
  assert 'exit status 0' in log  # the run itself went on
  laptop.tpu('status')
  status = worker.run(command_of(laptop.calls()[1])).stdout
  assert all(f': {line}\n' in status for line in report)


LIFECYCLE = [
  ['create', '--accelerator-type', None],
  ['push'],
  ['setup'],
  ['train', 'configs/cifar10.py', 'gs://b/run 1', TUPLE],
  ['status'],
  ['logs'],
  ['stop'],
  ['delete'],
]


@pytest.mark.parametrize('accelerator', ['v3-8', 'v4-32'])
def test_dry_run_prints_the_lifecycle_and_runs_nothing(tmp_path, repo, accelerator):
  laptop = Laptop(tmp_path, repo / 'launch' / 'tpu.sh')
  printed = {}
  for step in LIFECYCLE:
    args = [accelerator if a is None else a for a in step]
    lines = laptop.tpu('--dry-run', *args).stdout.splitlines()
    assert laptop.calls() == [] and not (tmp_path / 'pushed.tar.gz').exists()
    printed[step[0]] = [split_words(line) for line in lines]
    # Without --dry-run, gcloud gets exactly the printed commands.
    laptop.tpu(*args)
    called = laptop.calls()
    if step[0] == 'push':
      git, scp, ssh = printed['push']
      assert git[:4] == ['git', '-C', str(repo), 'archive']
      assert called == [scp[:5] + [called[0][5]] + scp[6:], ssh]
      (tmp_path / 'pushed.tar.gz').unlink()
    else:
      assert called == printed[step[0]]
  tpu_vm = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  assert printed['create'] == [
    tpu_vm
    + ['create', 't', f'--zone={ZONE}', f'--accelerator-type={accelerator}', f'--version={BASE}']
  ]
  assert [c[4] for c in printed['push'][1:]] == ['scp', 'ssh']
  assert [c[4] for c in printed['status']] == ['describe', 'ssh']
  for name in ('setup', 'train', 'logs', 'stop'):
    assert [c[:5] for c in printed[name]] == [tpu_vm + ['ssh']]
  assert 'args=( -m diffusion_jax.main --config=configs/cifar10.py --workdir=gs://b/run\\ 1 ' in (
    command_of(printed['train'][0])
  )
  assert printed['delete'] == [tpu_vm + ['delete', 't', f'--zone={ZONE}', '--quiet']]


GA, ALPHA = (
  ['gcloud', 'compute', 'tpus', 'tpu-vm'],
  ['gcloud', 'alpha', 'compute', 'tpus', 'tpu-vm'],
)


@pytest.mark.parametrize(
  'option, env, remote, flag',
  [
    ('--internal-ip', {}, GA, '--internal-ip'),
    (None, {'TPU_INTERNAL_IP': '1'}, GA, '--internal-ip'),
    ('--tunnel-through-iap', {}, ALPHA, '--tunnel-through-iap'),
    (None, {'TPU_TUNNEL_THROUGH_IAP': '1'}, ALPHA, '--tunnel-through-iap'),
  ],
)
def test_every_ssh_and_scp_can_reach_a_tpu_without_an_external_ip(
  tmp_path, repo, option, env, remote, flag
):
  laptop = Laptop(tmp_path, repo / 'launch' / 'tpu.sh')
  options = [option] if option else []
  reaching = 0
  for step in LIFECYCLE:
    args = ['v3-8' if a is None else a for a in step]
    for line in laptop.tpu(*options, '--dry-run', *args, env=env).stdout.splitlines():
      words = split_words(line)
      if words[0] != 'gcloud':
        continue
      if 'ssh' in words or 'scp' in words:
        assert words[: len(remote)] == remote and flag in words, words
        reaching += 1
      else:  # create, describe, delete: the API, not the VM
        assert words[:4] == GA and flag not in words, words
  assert reaching == 7  # push: scp and ssh; setup, train, status, logs, stop: ssh
  err = laptop.tpu('--internal-ip', '--tunnel-through-iap', 'status', code=2).stderr
  assert 'exclude each other' in err
  assert (
    'TPU_INTERNAL_IP is 1 or 0' in laptop.tpu('status', env={'TPU_INTERNAL_IP': 'y'}, code=2).stderr
  )


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_the_script_and_its_remote_scripts_pass_shellcheck(laptop):
  subprocess.run(['shellcheck', str(SCRIPT)], check=True)
  for step in LIFECYCLE[1:]:
    args = ['v3-8' if a is None else a for a in step]
    for line in laptop.tpu('--dry-run', *args).stdout.splitlines():
      words = split_words(line)
      if words[4] == 'ssh':  # SC2054: commas in array items, here escaped by printf %q
        shellcheck = ['shellcheck', '-s', 'bash', '-e', 'SC2054', '-']
        subprocess.run(shellcheck, input=command_of(words), text=True, check=True)
  # watch's remote script (watch has no --dry-run), as remote_script() makes it: it sets nothing.
  bodies = dict(re.findall(r"^heredoc (\w+) <<'EOF'\n(.*?)^EOF$", SCRIPT.read_text(), re.M | re.S))
  script = 'set -euo pipefail\n' + bodies['WORKER_BODY'] + bodies['RUN_STATE_BODY']
  subprocess.run(['shellcheck', '-s', 'bash', '-'], input=script, text=True, check=True)


# ----------------------------------------------------------------------------- a fake cloud


class Cloud:
  """The laptop's gcloud becomes tests/fake_cloud.py: TPU VMs whose workers are folders here,
  where the recorded stand-ins serve the remote scripts and ``trainer`` (a command line) is the
  venv's python for ``-m ...`` (setup's probes pass)."""

  def __init__(self, tmp_path: pathlib.Path, laptop: Laptop, trainer: str):
    self.laptop = laptop
    self.root = tmp_path / 'cloud'
    self.root.mkdir()
    self.finish = tmp_path / 'finish'  # the fake trainer's end (TRAINER)
    worker_bin = tmp_path / 'worker-bin'
    for name in ('gcloud', 'uv', 'python3', 'sudo', 'pgrep', 'hostname'):
      write_program(worker_bin / name, RECORDER)
    venv_python = tmp_path / 'venv-python'
    write_program(venv_python, f'#!/bin/sh\n[ "$1" = -m ] || exit 0\nexec {trainer} "$@"\n')
    fake_gcloud = (REPO / 'tests' / 'fake_cloud.py').read_text()
    write_program(laptop.bin / 'gcloud', f'#!{sys.executable}\n{fake_gcloud}')
    laptop.env.update(
      FAKE_CLOUD=str(self.root),
      FAKE_WORKER_PATH=f'{worker_bin}{os.pathsep}{os.environ["PATH"]}',
      FAKE_VENV_PYTHON=str(venv_python),
      FAKE_TRAINER_OUT=str(tmp_path / 'trainer.json'),
      FAKE_TRAINER_FINISH=str(self.finish),
      START_CHECK_SECONDS='1',
    )

  def home(self, worker: int = 0) -> pathlib.Path:
    return self.root / 't' / f'w{worker}'

  def groups(self, tpu: str = 't') -> list[int]:
    """The process groups of the runs on the workers of ``tpu`` (* for all)."""
    pidfiles = self.root.glob(f'{tpu}/w*/diffusion_jax/logs/train.pid')
    return [int(p.read_text()) for p in pidfiles if p.read_text().strip()]

  def close(self) -> None:
    """Ends what a failed test may leave running: the laptop's background commands, the runs."""
    for group in [p.pid for p in self.laptop.background] + self.groups('*'):
      with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)

  def running(self, workers: int = 1) -> bool:
    """Whether the run is alive on ``workers`` workers."""
    return sum(map(alive, self.groups())) == workers

  def preempt(self, queued: bool = False, sigterm_first: bool = False) -> None:
    """What Cloud TPU does: (a notice, SIGTERM: the run saves and exits; then) the state
    PREEMPTED and every process killed; a queued resource: its VM deleted, then SUSPENDED."""
    groups = self.groups()
    if sigterm_first:
      for group in groups:
        os.killpg(group, signal.SIGTERM)
      wait_for(lambda: not any(map(alive, groups)), timeout=60)
    if not queued:
      (self.root / 't' / 'state').write_text('PREEMPTED')
    for group in groups:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    wait_for(lambda: not any(map(alive, groups)))
    if queued:  # the VM goes at once: watch may make the next one right after SUSPENDED
      (self.root / 't.queued').write_text('SUSPENDED')
      (self.root / 't').rename(self.root / 't.preempted')
      shutil.rmtree(self.root / 't.preempted')


def alive(group: int) -> bool:
  """Whether a process of the process group ``group`` lives (a zombie not yet reaped does not)."""
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    with contextlib.suppress(OSError):
      state, _, pgrp = stat.read_text().rsplit(')', 1)[1].split()[:3]  # after "PID (NAME)"
      if int(pgrp) == group and state != 'Z':
        return True
  return False


@pytest.fixture
def cloud(tmp_path, repo):
  """A fake cloud for the launcher of ``repo``, with the fake trainer."""
  write_program(tmp_path / 'trainer', TRAINER)
  cloud = Cloud(tmp_path, Laptop(tmp_path, repo / 'launch' / 'tpu.sh'), str(tmp_path / 'trainer'))
  yield cloud
  cloud.close()


def test_a_failure_on_one_worker_fails_the_command_and_says_so(tmp_path, cloud):
  laptop = cloud.laptop
  laptop.tpu('create', '--accelerator-type', 'v4-16')  # two hosts
  laptop.tpu('push')
  laptop.tpu('setup')
  shutil.rmtree(cloud.home(1) / 'diffusion_jax' / '.venv')
  proc = laptop.tpu('train', 'configs/digits.py', str(tmp_path / 'w'), code=1)
  assert 't-w-0: the run ended at once, with exit status 0' in proc.stdout  # worker 0 ran it
  assert 't-w-1: no ' in proc.stderr and 'launch/tpu.sh setup' in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    'launch/tpu.sh: error: train failed on at least one worker (gcloud ssh --worker=all: exit '
    'status 1): see the messages above'
  )


def watch_lines(log: pathlib.Path) -> list[str]:
  """The watch log without the times."""
  lines = log.read_text().splitlines() if log.exists() else []
  assert all(re.match(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ', line) for line in lines), lines
  return [line.split(' ', 1)[1] for line in lines]


def wait_until_watched(log: pathlib.Path, runs: int) -> None:
  """Until watch has seen its run running ``runs`` times (one per VM)."""
  wait_for(lambda: watch_lines(log).count('run running on worker 0') >= runs, timeout=120)


def test_watch_brings_back_a_preempted_queued_tpu_and_ends_with_the_run(tmp_path, repo, cloud):
  laptop, log, out = cloud.laptop, tmp_path / 'watch.log', tmp_path / 'watch.out'
  create = ['--accelerator-type', 'v4-16', '--queued', '--spot', '--', '--network=n']
  train = ['configs/digits.py', str(tmp_path / 'w'), TUPLE]
  watch = laptop.start(
    *['watch', '--poll', '0.2', '--max-restarts', '3', '--log', str(log)],
    *['create', *create, 'train', *train],
    out=out,
    env={'FAKE_TRAINER_WAIT': '1'},
  )
  wait_until_watched(log, 1)
  cloud.preempt(queued=True)
  wait_until_watched(log, 2)
  cloud.finish.write_text('')  # the run ends: "Done: step 4", exit status 0
  assert watch.wait(60) == 0, out.read_text()
  calls = laptop.calls()
  made = QUEUED + ['--node-id=t', '--accelerator-type=v4-16', f'--runtime-version={BASE}']
  assert [c for c in calls if c[3:5] == ['queued-resources', 'create']] == [
    made + ['--spot', '--network=n']
  ] * 2
  assert [c[3:5] for c in calls if 'delete' in c] == [['queued-resources', 'delete']]
  assert sum('scp' in c for c in calls) == 2  # pushed to each VM
  for worker in (0, 1):
    assert (cloud.home(worker) / 'diffusion_jax' / 'COMMIT').read_text() == head(repo) + '\n'
  assert json.loads((tmp_path / 'trainer.json').read_text())['argv'][-1] == TUPLE
  lines = watch_lines(log)
  assert [line for line in lines if line.startswith('restart ')] == [
    'restart 1/3: TPU SUSPENDED: creating it again'
  ]
  assert lines[-1] == 'the run is complete: 12:00:00  Done: step 4 in w'
  for line in log.read_text().splitlines():  # each on stderr too
    assert f'launch/tpu.sh: watch: {line}\n' in out.read_text()


def test_watch_gives_up_after_max_restarts(tmp_path, cloud):
  laptop, log, out = cloud.laptop, tmp_path / 'watch.log', tmp_path / 'watch.out'
  env = {'FAKE_TRAINER_WAIT': '1', 'WATCH_POLL_SECONDS': '0.2', 'WATCH_LOG': str(log)}
  args = ['create', '--accelerator-type', 'v3-8', '--spot', 'train', 'configs/digits.py', 'w']
  watch = laptop.start('watch', '--max-restarts', '1', *args, out=out, env=env)
  for runs in (1, 2):
    wait_until_watched(log, runs)
    cloud.preempt(sigterm_first=True)
  assert watch.wait(60) == 1, out.read_text()
  creates = [c for c in laptop.calls() if c[3:5] == ['tpu-vm', 'create']]
  assert creates == [VM + ['--accelerator-type=v3-8', f'--version={BASE}', '--spot']] * 2
  assert [line for line in watch_lines(log) if line.startswith(('restart ', 'giving up'))] == [
    'restart 1/1: TPU PREEMPTED: creating it again',
    'giving up: TPU PREEMPTED: creating it again, but all 1 restarts are used (--max-restarts)',
  ]


def test_watch_starts_the_run_again_on_a_ready_tpu_that_lost_it(tmp_path, cloud):
  laptop, log, out = cloud.laptop, tmp_path / 'watch.log', tmp_path / 'watch.out'
  env = {'FAKE_TRAINER_WAIT': '1', 'WATCH_POLL_SECONDS': '0.2', 'WATCH_IDLE_SECONDS': '1'}
  args = ['create', '--accelerator-type', 'v3-8', 'train', 'configs/digits.py', 'w']
  watch = laptop.start('watch', '--log', str(log), *args, out=out, env=env)
  wait_until_watched(log, 1)
  (group,) = cloud.groups()
  os.killpg(group, signal.SIGTERM)  # the run saves and ends; the TPU stays READY (maintenance)
  wait_until_watched(log, 2)
  cloud.finish.write_text('')
  assert watch.wait(60) == 0, out.read_text()
  lines = watch_lines(log)
  assert lines.count('run stopped on worker 0') == 1
  assert 'restart 1/10: TPU READY, run stopped: starting it again' in lines
  assert sum(c[3:5] == ['tpu-vm', 'create'] for c in laptop.calls()) == 1


@pytest.mark.parametrize('when', ['at start', 'later'])
def test_watch_ends_when_the_run_fails(tmp_path, cloud, when):
  laptop, out = cloud.laptop, tmp_path / 'watch.out'
  env = {'FAKE_TRAINER_EXIT': '3'} if when == 'at start' else {'FAKE_TRAINER_WAIT': '1'}
  args = ['create', '--accelerator-type', 'v3-8', 'train', 'configs/digits.py', 'w']
  env.update(WATCH_POLL_SECONDS='0.2', WATCH_LOG=str(tmp_path / 'watch.log'))
  watch = laptop.start('watch', *args, out=out, env=env)
  if when == 'later':
    wait_until_watched(tmp_path / 'watch.log', 1)
    cloud.finish.write_text('3')
  assert watch.wait(60) == 1, out.read_text()
  text = out.read_text()
  if when == 'at start':
    assert 'the run ended at once, with exit status 3' in text
    assert text.strip().endswith('error: watch: the run could not be started (see above)')
  else:
    assert 'the run failed: watch ends without restarting it' in text
    assert 'error: training diverged' in text and 'exit status 3' in text
  assert sum(c[3:5] == ['tpu-vm', 'create'] for c in laptop.calls()) == 1


WATCHED = ['create', '--accelerator-type', 'v3-8', 'train', 'configs/digits.py', 'w']


@pytest.mark.parametrize(
  'args, message',
  [
    ([], 'watch needs create CREATE_ARGS... train CONFIG WORKDIR'),
    (WATCHED[:3], 'watch needs create CREATE_ARGS... train CONFIG WORKDIR'),
    (['--poll', '1m', *WATCHED], '--poll takes seconds, not 1m'),
    (['--max-restarts', '-1', *WATCHED], '--max-restarts takes a number, not -1'),
    (['create', '--accelerator-type', 'tpu7x-8', *WATCHED[3:]], 'create them with GKE'),
    (WATCHED[:5], 'train needs CONFIG WORKDIR'),
  ],
)
def test_watch_usage_errors_are_its_commands_own(laptop, args, message):
  err = laptop.tpu('watch', *args, code=2).stderr
  assert message in err and len(err.strip().splitlines()) == 1, err
  assert 'no --dry-run' in laptop.tpu('--dry-run', 'watch', *WATCHED, code=2).stderr
  assert laptop.calls() == []


@pytest.mark.slow
def test_watch_brings_a_twice_preempted_run_to_the_end_of_an_uninterrupted_one(
  tmp_path, data_dir, request
):
  """The real trainer on a fake spot TPU (single process, JAX on 2 CPU devices), preempted twice
  mid-run (with a SIGTERM notice, then without), finishes with the state of a run that nobody
  interrupted."""
  import chex
  import jax

  from diffusion_jax import train_state
  from diffusion_jax.run import Run

  from conftest import load_config, run_main

  repo = tmp_path / 'repo'  # what push sends: this checkout's code, committed
  for part in ('diffusion_jax', 'configs', 'launch'):
    shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(REPO / 'requirements.txt', repo)
  commit_all(repo)
  cloud = Cloud(
    tmp_path,
    Laptop(tmp_path, repo / 'launch' / 'tpu.sh'),
    f'env JAX_PLATFORMS=cpu {sys.executable}',
  )
  request.addfinalizer(cloud.close)
  steps = 40
  flags = [
    f'--config.dataset.data_dir={data_dir}',
    f'--config.train.num_train_steps={steps}',
    '--config.train.log_every_steps=4',
    '--config.train.checkpoint_every_steps=4',
    '--config.train.sample_every_steps=1000',  # none
    '--config.evals.digits.every_steps=0',
    '--nodistributed',  # after train's --distributed: one process, no cluster to join
  ]
  reference = run_main('--config=configs/digits.py:tiny', f'--workdir={tmp_path / "ref"}', *flags)
  workdir, log, out = tmp_path / 'workdir', tmp_path / 'watch.log', tmp_path / 'watch.out'
  watch = cloud.laptop.start(
    *['watch', '--poll', '0.3', '--max-restarts', '4', '--log', str(log)],
    *['create', '--accelerator-type', 'v3-8', '--spot'],
    *['train', 'configs/digits.py:tiny', str(workdir), *flags],
    out=out,
    env={'START_CHECK_SECONDS': '3'},
  )

  def saved() -> int:
    """The newest complete checkpoint's step in the workdir (the bucket every VM shares)."""
    names = os.listdir(workdir / 'checkpoints') if (workdir / 'checkpoints').exists() else []
    return max((int(n) for n in names if n.isdigit()), default=0)

  wait_for(lambda: saved() >= 8, timeout=300)
  cloud.preempt(sigterm_first=True)
  wait_until_watched(log, 2)
  wait_for(lambda: saved() >= 24, timeout=300)
  cloud.preempt()
  assert watch.wait(300) == 0, out.read_text()[-5000:]
  reference_out, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, reference_out[-3000:]

  lines = watch_lines(log)
  assert [line for line in lines if line.startswith('restart ')] == [
    f'restart {n}/4: TPU PREEMPTED: creating it again' for n in (1, 2)
  ]
  assert re.fullmatch(rf'the run is complete: \S+  Done: step {steps} in {workdir}', lines[-1])
  train_log = (cloud.home() / 'diffusion_jax' / 'logs' / 'train_t-w-0.log').read_text()
  resumed = int(re.search(r'Resumed from step (\d+)', train_log)[1])
  assert 24 <= resumed < steps  # the third VM went on from the second one's checkpoint
  config = load_config('digits.py:tiny', data_dir)
  abstract = Run.create(config).abstract_state()
  states = [train_state.restore_latest(w, abstract) for w in (tmp_path / 'ref', workdir)]
  trees = [jax.device_get((s.step, s.params, s.ema_params, s.opt_state, s.rng)) for s in states]
  assert int(trees[0][0]) == steps
  chex.assert_trees_all_equal(*trees)
