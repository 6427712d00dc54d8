"""The notebook's install decisions (``notebooks/colab_install.py``) on Colab's own images: the
package lists of its CPU, TPU and GPU runtimes (``tests/data/colab``, from googlecolab/backend-info)
against what the lock installs here. What is replaced, what is removed first, when the kernel must
restart, and that a second run changes nothing.
"""

import importlib.metadata
import importlib.util
import sys

import pytest
from packaging.requirements import Requirement

from conftest import REPO

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python

spec = importlib.util.spec_from_file_location('colab_install', REPO / 'notebooks/colab_install.py')
colab_install = importlib.util.module_from_spec(spec)
sys.modules['colab_install'] = colab_install  # dataclasses look their module up
spec.loader.exec_module(colab_install)

IMAGES = REPO / 'tests' / 'data' / 'colab'


def image(runtime: str) -> dict[str, str]:
  """{name: version} preinstalled on Colab's ``runtime`` image."""
  return colab_install.read_freeze((IMAGES / f'{runtime}.txt').read_text().splitlines())


def locked_closure(extras: tuple[str, ...] = ()) -> dict[str, str]:
  """What pip installs for the package under the lock: the package's requirements (with
  ``extras``), recursively, at the versions installed here (this venv is made from the lock)."""
  versions, seen, todo = {}, set(), [('diffusion-jax', extras)]
  while todo:
    name, extras = todo.pop()
    if (name, extras) in seen:
      continue
    seen.add((name, extras))
    for text in importlib.metadata.requires(name) or ():
      requirement = Requirement(text)
      environments = [{'extra': extra} for extra in ('', *extras)]
      if requirement.marker and not any(requirement.marker.evaluate(e) for e in environments):
        continue
      dependency = colab_install.normalize(requirement.name)
      versions[dependency] = importlib.metadata.version(dependency)
      todo.append((dependency, tuple(sorted(requirement.extras))))
  return versions


def modules_here(name: str) -> set[str]:
  """A distribution's modules as installed here (Colab's `tensorflow` as this venv's
  tensorflow-cpu: the same modules)."""
  twin = {old: new for new, olds in colab_install.SAME_MODULE.items() for old in olds}
  return colab_install.installed_modules(twin.get(name, name))


def test_the_lock_resolution_here_is_the_lock():
  pins = colab_install.read_freeze(colab_install.lock_file(REPO).read_text().splitlines())
  closure = locked_closure(('tpu',))
  assert closure and all(pins[name] == version for name, version in closure.items())
  assert {'jax', 'flax', 'tensorflow-cpu', 'libtpu'} <= closure.keys()
  assert not {'pytest', 'ruff', 'ipykernel', 'uv'} & closure.keys()  # developer tools stay out


@pytest.mark.skipif(sys.version_info[:2] == (3, 11), reason="Colab's images run Python 3.13")
def test_cpu_image_replaces_the_stack_removes_tensorflow_and_restarts_for_numpy():
  colab = image('cpu')
  plan = colab_install.plan(colab, locked_closure(), {'numpy', 'IPython'}, modules_here)
  assert plan.replace['jax'] == (colab['jax'], importlib.metadata.version('jax'))
  assert {'jaxlib', 'flax', 'numpy', 'protobuf', 'orbax-checkpoint'} <= plan.replace.keys()
  assert plan.remove == ('tensorflow',)  # Colab's full TensorFlow, where tensorflow-cpu goes
  assert 'tensorflow-cpu' in plan.add and 'libtpu' not in plan.add
  assert plan.restart_for == ('numpy',)
  assert (
    'tensorflow 2.20.0' not in plan.describe() and 'removed first: tensorflow' in plan.describe()
  )
  assert colab_install.RESOLVER_NOTE in plan.describe()
  # Modules no replaced distribution owns (IPython, a namespace such as google) ask no restart.
  unchanged = colab_install.plan(
    colab, locked_closure(), {'IPython', 'google', 'ipykernel'}, modules_here
  )
  assert unchanged.restart_for == ()
  # TensorFlow loaded: its distribution goes, so the kernel must restart.
  loaded_tf = colab_install.plan(colab, locked_closure(), {'tensorflow'}, modules_here)
  assert loaded_tf.restart_for == ('tensorflow',)


@pytest.mark.skipif(sys.version_info[:2] == (3, 11), reason="Colab's images run Python 3.13")
def test_tpu_image_gets_the_tpu_runtime_and_restarts_for_a_loaded_jax():
  colab, closure = image('tpu'), locked_closure(('tpu',))
  plan = colab_install.plan(colab, closure, {'jax', 'jax._src', 'IPython'}, modules_here)
  assert plan.replace['libtpu'] == (colab['libtpu'], closure['libtpu'])
  assert plan.replace['jax'][0] == colab['jax'] and plan.remove == ()  # no TensorFlow on it
  assert 'tensorflow-cpu' in plan.add
  assert plan.restart_for == ('jax', 'jax._src')
  assert colab_install.plan(colab, closure, {'IPython'}, modules_here).restart_for == ()


@pytest.mark.skipif(sys.version_info[:2] == (3, 11), reason="Colab's images run Python 3.13")
def test_gpu_image_drops_jax_cuda_plugins_of_the_old_jax():
  colab = image('gpu')
  plan = colab_install.plan(colab, locked_closure(), set(), modules_here)
  assert plan.remove == ('jax-cuda12-pjrt', 'jax-cuda12-plugin', 'tensorflow')
  assert plan.restart_for == ()


@pytest.mark.parametrize('runtime', ['cpu', 'tpu', 'gpu'])
def test_a_second_run_changes_nothing(runtime):
  extras = ('tpu',) if runtime == 'tpu' else ()
  closure = locked_closure(extras)
  after = {**image(runtime), **closure}  # the first run installed the closure
  for names in colab_install.SAME_MODULE.values():
    for name in names:
      after.pop(name, None)
  after = {k: v for k, v in after.items() if not colab_install.JAX_PLUGIN.fullmatch(k)}
  plan = colab_install.plan(after, closure, set(sys.modules), modules_here)
  assert plan.replace == {} and plan.add == {} and plan.remove == () and plan.restart_for == ()
  assert 'RESOLVER' not in plan.describe() and 'replaces 0' in plan.describe()


def test_module_names_of_a_distribution():
  files = [
    'google/protobuf/__init__.py',
    'google/protobuf/internal/decoder.py',
    'google/_upb/_message.abi3.so',
    'protobuf-7.36.2.dist-info/RECORD',
    '../../bin/tool',
    'numpy.libs/libscipy_openblas.so',
  ]
  assert colab_install.module_names(files) == {
    'google.protobuf',
    'google.protobuf.internal.decoder',
    'google._upb._message',
  }


@pytest.mark.parametrize(
  ('version', 'lock'), [((3, 11), 'requirements-py311.txt'), ((3, 13), 'requirements.txt')]
)
def test_lock_file_by_python(version, lock):
  assert colab_install.lock_file(REPO, version) == REPO / lock
  assert colab_install.lock_file(REPO, version).exists()


def test_an_unsupported_python_is_named():
  with pytest.raises(RuntimeError, match='Python 3.14 is not supported'):
    colab_install.lock_file(REPO, (3, 14))
