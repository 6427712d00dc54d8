"""``launch/gke/jobset.yaml`` and ``launch/gke/Dockerfile``, checked offline.

``problems(manifest)`` lists what GKE or this project would reject: the JobSet's kind and fields,
the TPU slice (node labels, chips requested, pods), and the container's command (this project's
entry point, flags that ``diffusion_jax.main`` defines, a config file that exists, config fields
that exist, a global batch that divides over the slice's devices). The shipped manifest must have
none, and each check is shown to fail on a manifest broken in the way it guards against.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import yaml

from diffusion_jax import config_defaults

from conftest import REPO

MANIFEST = REPO / 'launch' / 'gke' / 'jobset.yaml'
DOCKERFILE = REPO / 'launch' / 'gke' / 'Dockerfile'
ENTRY_POINT = ['python', '-m', 'diffusion_jax.main']

# GKE's node label cloud.google.com/gke-tpu-accelerator -> (dimensions of its topology label, the
# chips of one VM of a single-host slice, JAX devices per chip). A multi-host slice always has 4
# chips per VM (ct4p-hightpu-4t, ct5lp-hightpu-4t, ct5p-hightpu-4t, ct6e-standard-4t,
# tpu7x-standard-4t). v4, v5p and TPU7x chips have two TensorCores, shown as one JAX device (v4,
# v5p: megacore) or two (TPU7x).
TPU_ACCELERATORS = {
  'tpu-v4-podslice': (3, {4}, 1),
  'tpu-v5-lite-podslice': (2, {1, 4, 8}, 1),
  'tpu-v5p-slice': (3, {4}, 1),
  'tpu-v6e-slice': (2, {1, 4, 8}, 1),
  'tpu7x': (3, {1, 4}, 2),
}
MULTI_HOST_CHIPS_PER_VM = 4

# The fields of the objects the manifest writes (JobSet v1alpha2, batch/v1 Job, core/v1 Pod and
# Container); a misspelt key is rejected by the API server's strict field validation.
JOBSET_SPEC_KEYS = {
  'replicatedJobs',
  'network',
  'successPolicy',
  'failurePolicy',
  'startupPolicy',
  'suspend',
  'coordinator',
  'managedBy',
  'ttlSecondsAfterFinished',
}
REPLICATED_JOB_KEYS = {'name', 'replicas', 'template', 'dependsOn'}
JOB_SPEC_KEYS = {
  'parallelism',
  'completions',
  'completionMode',
  'backoffLimit',
  'backoffLimitPerIndex',
  'maxFailedIndexes',
  'activeDeadlineSeconds',
  'ttlSecondsAfterFinished',
  'podFailurePolicy',
  'podReplacementPolicy',
  'successPolicy',
  'suspend',
  'manualSelector',
  'selector',
  'template',
}
POD_SPEC_KEYS = {
  'affinity',
  'containers',
  'dnsPolicy',
  'hostNetwork',
  'imagePullSecrets',
  'initContainers',
  'nodeSelector',
  'priorityClassName',
  'restartPolicy',
  'schedulingGates',
  'securityContext',
  'serviceAccountName',
  'subdomain',
  'terminationGracePeriodSeconds',
  'tolerations',
  'volumes',
}
CONTAINER_KEYS = {
  'args',
  'command',
  'env',
  'envFrom',
  'image',
  'imagePullPolicy',
  'lifecycle',
  'name',
  'ports',
  'resources',
  'securityContext',
  'volumeMounts',
  'workingDir',
}
DNS_LABEL = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?')


def load_manifest() -> dict:
  documents = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc is not None]
  assert len(documents) == 1, f'{MANIFEST} should hold one JobSet, not {len(documents)} documents'
  return documents[0]


@pytest.fixture(scope='module')
def main_flags() -> dict[str, bool]:
  """Every flag ``python -m diffusion_jax.main`` accepts (absl's, JAX's and its own), name ->
  whether it is a boolean; read from the module in a process of its own."""
  code = (
    'import json\n'
    'from absl import flags\n'
    'import diffusion_jax.main\n'
    'print(json.dumps({name: flags.FLAGS[name].boolean for name in flags.FLAGS}))\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _unknown_keys(where: str, mapping: object, known: set[str]) -> list[str]:
  if not isinstance(mapping, dict):
    return [f'{where} is not a mapping']
  return [f'{where} has the unknown key {key!r}' for key in sorted(set(mapping) - known)]


def _flag_values(args: list[str]) -> dict[str, str | None]:
  """``--name=value`` and ``--name`` arguments as {name: value or None}; the later one wins."""
  values = {}
  for arg in args:
    name, eq, value = arg.removeprefix('--').partition('=')
    values[name] = value if eq else None
  return values


def _check_command(
  container: dict, flags_defined: dict[str, bool], devices: int | None
) -> list[str]:
  """The container runs this project's trainer on a gs:// workdir with real flags and config."""
  found = []
  if container.get('command') != ENTRY_POINT:
    found.append(f'the command is {container.get("command")}, not {ENTRY_POINT}')
  if not (REPO / 'diffusion_jax' / 'main.py').is_file():
    found.append('diffusion_jax/main.py, the entry point, does not exist')
  args = container.get('args') or []
  bad = [arg for arg in args if not isinstance(arg, str) or not arg.startswith('--')]
  found += [f'argument {arg!r} is not a --flag' for arg in bad]
  values = _flag_values([arg for arg in args if arg not in bad])
  for name in values:
    if name.startswith('config.'):
      continue
    known = name in flags_defined or (
      name.startswith('no') and flags_defined.get(name.removeprefix('no')) is True
    )
    if not known:
      found.append(f'--{name} is not a flag of diffusion_jax.main')
  if 'distributed' not in values or 'nodistributed' in values:
    found.append('--distributed is missing: each pod must join the slice with the others')
  workdir = values.get('workdir') or ''
  if not workdir.startswith('gs://'):
    found.append(f'--workdir={workdir} is not gs://: every host must share the workdir')
  cache = values.get('jax_compilation_cache_dir')
  if cache is not None and not cache.startswith('gs://'):
    found.append(f'--jax_compilation_cache_dir={cache} is not gs://: it would die with the pod')
  config_file, _, _ = (values.get('config') or '').partition(':')
  if not config_file or not (REPO / config_file).is_file():
    found.append(f'no config file {config_file!r} in the repository (--config)')
    return found
  config = config_defaults.load(str(REPO / values['config']))
  for name, value in values.items():
    if not name.startswith('config.'):
      continue
    node, path = config, name.removeprefix('config.').split('.')
    for i, part in enumerate(path):
      if not hasattr(node, 'keys') or part not in node:
        found.append(f'--{name}: the config has no field {".".join(path[: i + 1])!r}')
        break
      if i == len(path) - 1 and part == 'batch_size' and path[0] == 'train':
        try:
          config.train.batch_size = int(value)
        except (TypeError, ValueError):
          found.append(f'--{name}={value} is not an integer')
      node = node[part]
  if devices and config.train.batch_size % devices:
    found.append(
      f"train.batch_size={config.train.batch_size} does not divide over the slice's "
      f'{devices} devices'
    )
  env = {item.get('name'): item.get('value') for item in container.get('env') or []}
  if env.get('JAX_PLATFORMS') != 'tpu':
    found.append('JAX_PLATFORMS is not tpu: a TPU that cannot start would fall back to the CPU')
  return found


def _check_slice(job: dict, pod: dict, containers: list) -> tuple[list[str], int | None]:
  """The pods fill one TPU slice: labels GKE sets, one pod per VM, every chip requested once.
  Returns the problems and the slice's JAX device count (None if unknown)."""
  found = []
  selector = pod.get('nodeSelector') or {}
  accelerator = selector.get('cloud.google.com/gke-tpu-accelerator')
  topology = str(selector.get('cloud.google.com/gke-tpu-topology', ''))
  if accelerator not in TPU_ACCELERATORS:
    return [
      f'nodeSelector gke-tpu-accelerator {accelerator!r} is not one of {TPU_ACCELERATORS}'
    ], None
  dims, single_host_chips, devices_per_chip = TPU_ACCELERATORS[accelerator]
  if not re.fullmatch(rf'\d+(x\d+){{{dims - 1}}}', topology):
    return [f'gke-tpu-topology {topology!r} is not {dims}-dimensional, as {accelerator} is'], None
  chips = math.prod(int(size) for size in topology.split('x'))
  requested = []
  for container in containers:
    resources = container.get('resources') or {}
    limit = (resources.get('limits') or {}).get('google.com/tpu')
    request = (resources.get('requests') or {}).get('google.com/tpu', limit)
    if limit is not None and (not isinstance(limit, int) or request != limit):
      found.append(f'google.com/tpu must be an integer limit (and request, if any): {resources}')
    requested.append(limit or 0)
  per_pod = sum(requested)
  pods = job.get('parallelism')
  if job.get('completions') != pods:
    found.append(f'completions {job.get("completions")} != parallelism {pods}: one pod per VM')
  if chips in single_host_chips:
    vms, per_vm = 1, chips
  else:
    vms, per_vm = chips // MULTI_HOST_CHIPS_PER_VM, MULTI_HOST_CHIPS_PER_VM
  if per_pod != per_vm or pods != vms:
    found.append(
      f'{accelerator} {topology} is {chips} chips on {vms} VM(s) of {per_vm}: the manifest '
      f'runs {pods} pod(s) requesting google.com/tpu {per_pod} each'
    )
  if vms > 1 and job.get('backoffLimit') != 0:
    found.append('backoffLimit must be 0: one failed host must restart the whole slice')
  return found, chips * devices_per_chip


def problems(manifest: dict, flags_defined: dict[str, bool]) -> list[str]:
  """What GKE or this project would reject in ``manifest`` (empty: nothing)."""
  found = []
  if manifest.get('apiVersion') != 'jobset.x-k8s.io/v1alpha2':
    found.append(f'apiVersion {manifest.get("apiVersion")!r} is not jobset.x-k8s.io/v1alpha2')
  if manifest.get('kind') != 'JobSet':
    found.append(f'kind {manifest.get("kind")!r} is not JobSet')
  name = (manifest.get('metadata') or {}).get('name', '')
  if not DNS_LABEL.fullmatch(str(name)) or len(str(name)) > 63:
    found.append(f'metadata.name {name!r} is not a DNS label (pod names derive from it)')
  spec = manifest.get('spec') or {}
  found += _unknown_keys('spec', spec, JOBSET_SPEC_KEYS)
  if ((spec.get('failurePolicy') or {}).get('maxRestarts') or 0) < 1:
    found.append('spec.failurePolicy.maxRestarts < 1: a preemption would end the run for good')
  replicated = spec.get('replicatedJobs')
  if not isinstance(replicated, list) or len(replicated) != 1:
    return [*found, 'spec.replicatedJobs must hold one job: one TPU slice']
  rjob = replicated[0]
  found += _unknown_keys('replicatedJobs[0]', rjob, REPLICATED_JOB_KEYS)
  if not rjob.get('name') or rjob.get('replicas') != 1:
    found.append('replicatedJobs[0] needs a name and replicas: 1 (one slice)')
  job = ((rjob.get('template') or {}).get('spec')) or {}
  found += _unknown_keys('the Job spec', job, JOB_SPEC_KEYS)
  pod = ((job.get('template') or {}).get('spec')) or {}
  found += _unknown_keys('the Pod spec', pod, POD_SPEC_KEYS)
  if pod.get('restartPolicy') not in ('Never', 'OnFailure'):
    found.append(f'restartPolicy {pod.get("restartPolicy")!r}: a Job takes Never or OnFailure')
  containers = pod.get('containers')
  if not isinstance(containers, list) or len(containers) != 1:
    return [*found, 'the Pod spec must hold one container: the trainer']
  container = containers[0]
  found += _unknown_keys('the container', container, CONTAINER_KEYS)
  if not container.get('name') or not container.get('image'):
    found.append('the container needs a name and an image')
  slice_problems, devices = _check_slice(job, pod, containers)
  found += slice_problems
  found += _check_command(container, flags_defined, devices)
  return found


def test_shipped_manifest_has_no_problems(main_flags):
  assert problems(load_manifest(), main_flags) == []


def _pod(m: dict) -> dict:
  return m['spec']['replicatedJobs'][0]['template']['spec']['template']['spec']


def _container(m: dict) -> dict:
  return _pod(m)['containers'][0]


def _set_arg(m: dict, old_prefix: str, new: str | None) -> None:
  args = _container(m)['args']
  kept = [arg for arg in args if not arg.startswith(old_prefix)]
  _container(m)['args'] = kept + ([new] if new else [])


BROKEN: list[tuple[str, Callable[[dict], None], str]] = [
  ('kind', lambda m: m.update(kind='Job'), 'is not JobSet'),
  ('api', lambda m: m.update(apiVersion='batch/v1'), 'apiVersion'),
  ('no restarts', lambda m: m['spec']['failurePolicy'].update(maxRestarts=0), 'maxRestarts'),
  ('typo', lambda m: _pod(m).update(nodeselector=_pod(m).pop('nodeSelector')), "'nodeselector'"),
  (
    'chips per pod',
    lambda m: _container(m)['resources']['limits'].update({'google.com/tpu': 8}),
    'requesting google.com/tpu 8',
  ),
  (
    'pods',
    lambda m: m['spec']['replicatedJobs'][0]['template']['spec'].update(parallelism=4),
    'runs 4 pod(s)',
  ),
  (
    'topology',
    lambda m: _pod(m)['nodeSelector'].update({'cloud.google.com/gke-tpu-topology': '2x2'}),
    'not 3-dimensional',
  ),
  (
    'accelerator',
    lambda m: _pod(m)['nodeSelector'].update({'cloud.google.com/gke-tpu-accelerator': 'v3-8'}),
    'is not one of',
  ),
  ('restart policy', lambda m: _pod(m).update(restartPolicy='Always'), 'restartPolicy'),
  (
    'entry point',
    lambda m: _container(m).update(command=['python', '-m', 'diffusion_jax.train']),
    'not [',
  ),
  ('config file', lambda m: _set_arg(m, '--config=', '--config=configs/nope.py'), 'no config'),
  ('flag', lambda m: _set_arg(m, '--no_such', '--no_such_flag=1'), 'not a flag'),
  (
    'config field',
    lambda m: _set_arg(m, '--config.train.b', '--config.train.batchsize=8'),
    "no field 'train.batchsize'",
  ),
  (
    'batch',
    lambda m: _set_arg(m, '--config.train.b', '--config.train.batch_size=100'),
    'does not divide over',
  ),
  ('workdir', lambda m: _set_arg(m, '--workdir=', '--workdir=/tmp/run'), 'is not gs://'),
  ('distributed', lambda m: _set_arg(m, '--distributed', None), '--distributed is missing'),
  ('platform', lambda m: _container(m).update(env=[]), 'JAX_PLATFORMS'),
]


@pytest.mark.parametrize('name,breaks,expected', BROKEN, ids=[case[0] for case in BROKEN])
def test_each_check_fails_on_a_broken_manifest(main_flags, name, breaks, expected):
  manifest = copy.deepcopy(load_manifest())
  breaks(manifest)
  found = problems(manifest, main_flags)
  assert any(expected in problem for problem in found), (name, found)


def test_boolean_flags_take_their_no_form(main_flags):
  """``--nodistributed`` is a real flag (and is reported as turning distribution off)."""
  manifest = copy.deepcopy(load_manifest())
  _set_arg(manifest, '--nodist', '--nodistributed')
  found = problems(manifest, main_flags)
  assert not any('not a flag' in problem for problem in found)
  assert any('--distributed is missing' in problem for problem in found)


def test_dockerfile_builds_what_the_manifest_runs():
  """Python 3.13 (a supported Python) with the lock file, and the package and configs/ where the
  manifest's relative --config is read (the image's working directory)."""
  text = DOCKERFILE.read_text()
  base = re.search(r'^FROM python:(\d+\.\d+)\S*', text, re.M)
  assert base and base.group(1) == '3.13', base
  assert re.search(r'^RUN pip install -r requirements\.txt$', text, re.M)
  assert 'libtpu==' in (REPO / 'requirements.txt').read_text()
  workdir = re.findall(r'^WORKDIR (\S+)$', text, re.M)
  assert workdir == ['/app']
  copied = re.findall(r'^COPY (.+) (\S+)$', text, re.M)
  sources = {src for group, _ in copied for src in group.split()}
  config = _flag_values(_container(load_manifest())['args'])['config'].partition(':')[0]
  assert config.split('/')[0] in sources, (config, sources)
  assert {'diffusion_jax', 'requirements.txt', 'setup.cfg'} <= sources
  for source in sources:
    assert (REPO / source).exists(), source


def test_the_documented_v6e_16_variant_has_no_problems(main_flags):
  """docs/cloud_tpu.md's other slice: v6e, topology 4x4, 4 VMs of 4 chips."""
  manifest = copy.deepcopy(load_manifest())
  _pod(manifest)['nodeSelector'] = {
    'cloud.google.com/gke-tpu-accelerator': 'tpu-v6e-slice',
    'cloud.google.com/gke-tpu-topology': '4x4',
  }
  manifest['spec']['replicatedJobs'][0]['template']['spec'].update(parallelism=4, completions=4)
  assert problems(manifest, main_flags) == []
