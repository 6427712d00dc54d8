"""A stand-in for ``gcloud`` that emulates Cloud TPU VMs on this machine, for launch/tpu.sh's tests.

The cloud is the folder $FAKE_CLOUD. The TPU VM NAME is its folder NAME: ``state`` (READY, or what
a test writes there: PREEMPTED, ...) and one home folder per worker, ``w0``, ``w1``, ... (one per
8 cores of the accelerator type: v3-8 has one host, v4-16 two). The queued resource NAME is the
file ``NAME.queued`` (its state). ``ssh --command=SCRIPT`` runs SCRIPT with bash in each worker's
home (HOME; PATH $FAKE_WORKER_PATH; $FAKE_HOSTNAME NAME-w-N; the $FAKE_* settings; $FAKE_LOG the
home's ``.jsonl`` beside it) and exits with the first failure's status; ``scp`` copies into the
homes; ``delete`` kills the runs of the workers (their pidfiles) and removes the VM. Every call
is appended to $FAKE_LOG as a JSON list, as the other stand-ins do.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

CLOUD = pathlib.Path(os.environ['FAKE_CLOUD'])


def option(argv: list[str], name: str) -> str | None:
  """The value of ``--name=VALUE`` in argv."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  return values[-1] if values else None


def not_found(kind: str, name: str) -> None:
  sys.exit(
    f'ERROR: (gcloud.compute.tpus.{kind}) NOT_FOUND: Resource '
    f"'projects/p/locations/z/{kind}/{name}' was not found"
  )


def homes(vm: pathlib.Path) -> list[pathlib.Path]:
  workers = [path for path in vm.glob('w[0-9]*') if path.is_dir()]
  return sorted(workers, key=lambda home: int(home.name[1:]))


def create_vm(name: str, argv: list[str]) -> None:
  vm = CLOUD / name
  if vm.exists():
    sys.exit(f'ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: {name}')
  cores = int(re.search(r'-(\d+)$', option(argv, 'accelerator-type')).group(1))
  for i in range(max(1, cores // 8)):
    (vm / f'w{i}').mkdir(parents=True)
  (vm / 'state').write_text('READY')


def delete_vm(vm: pathlib.Path) -> None:
  """The VM and the processes on it."""
  for pidfile in vm.glob('w*/diffusion_jax/logs/train.pid'):
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass
  shutil.rmtree(vm)


def check_reachable(vm: pathlib.Path) -> None:
  """ssh and scp reach a READY VM only."""
  if (vm / 'state').read_text() != 'READY':
    sys.exit(f'ssh: connect to host {vm.name}: Connection refused')


def run_on_workers(vm: pathlib.Path, argv: list[str]) -> None:
  """ssh: the command on the workers, one after the other."""
  check_reachable(vm)
  worker = option(argv, 'worker') or '0'
  status = 0
  for home in homes(vm) if worker == 'all' else [vm / f'w{worker}']:
    env = {k: v for k, v in os.environ.items() if k.startswith('FAKE_')}
    env.update(
      HOME=str(home),
      PATH=os.environ['FAKE_WORKER_PATH'],
      FAKE_HOSTNAME=f'{vm.name}-w-{home.name[1:]}',
      FAKE_LOG=str(home.with_suffix('.jsonl')),
      LANG='C.UTF-8',
    )
    done = subprocess.run(['bash', '-c', option(argv, 'command')], cwd=home, env=env)
    status = status or done.returncode
  sys.exit(status)


def main(argv: list[str]) -> None:
  with open(os.environ['FAKE_LOG'], 'a') as log:
    log.write(json.dumps(['gcloud', *argv]) + '\n')
  if argv[:1] == ['alpha']:
    argv = argv[1:]
  if argv[:3] != ['compute', 'tpus', 'tpu-vm'] and argv[:3] != [
    'compute',
    'tpus',
    'queued-resources',
  ]:
    sys.exit(f'fake gcloud: no such command: {argv}')
  kind, verb, rest = argv[2], argv[3], argv[4:]
  name = rest[0] if verb != 'scp' else rest[1].split(':')[0]
  vm, queued = CLOUD / name, CLOUD / f'{name}.queued'
  if kind == 'queued-resources':
    if verb == 'create':
      if queued.exists():
        sys.exit(f'ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {name}')
      create_vm(option(rest, 'node-id'), rest)
      queued.write_text('ACTIVE')
      return
    if not queued.exists():
      not_found('queued-resources', name)
    if verb == 'describe':
      print(queued.read_text())
    elif verb == 'delete':
      queued.unlink()
      if vm.exists():
        delete_vm(vm)
    return
  if verb == 'create':
    create_vm(name, rest)
    return
  if not vm.exists():
    not_found('nodes', name)
  if verb == 'describe':
    state = (vm / 'state').read_text()
    print(state if option(rest, 'format') == 'value(state)' else f'state: {state}')
  elif verb == 'delete':
    delete_vm(vm)
  elif verb == 'scp':
    check_reachable(vm)
    source, destination = rest[0], rest[1].split(':', 1)[1].removeprefix('~/')
    for home in homes(vm):
      shutil.copy(source, home / destination)
  elif verb == 'ssh':
    run_on_workers(vm, rest)


if __name__ == '__main__':
  main(sys.argv[1:])
