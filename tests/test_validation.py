"""In-process checks of a config (``validation.validate``) and of a workdir (``workdir_config``):
every range, choice and model check names the field, its value and the fix, all problems come in
one error, and a workdir's config.json stops a command that would change its model."""

import json
import logging

import pytest

from diffusion_jax import convert, validation, workdir_config
from diffusion_jax.errors import SetupError
from diffusion_jax.run import Run

from conftest import REPO, load_config

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python


def problems_of(config, mode: str = 'train') -> str:
  """The message of ``validate``'s SetupError ('' if the config is valid)."""
  try:
    validation.validate(config, mode=mode)
  except SetupError as e:
    return str(e)
  return ''


@pytest.mark.parametrize(
  'name', [*sorted(p.name for p in (REPO / 'configs').glob('*.py')), 'digits.py:tiny']
)
def test_every_config_file_is_valid(name):
  config = load_config(name)
  for mode in ('train', 'sample'):
    assert problems_of(config, mode) == ''
  if 'fid' not in config.evals:  # FID needs the Inception weights to evaluate
    assert problems_of(config, 'eval') == ''


@pytest.mark.parametrize(
  'field, value, bound',
  [
    ('train.num_train_steps', 0, 'an integer >= 1'),
    ('train.steps_per_call', 0, 'None or an integer >= 1'),
    ('train.log_every_steps', 0, 'an integer >= 1'),
    ('train.checkpoint_every_steps', 0, 'an integer >= 1'),
    ('train.sample_every_steps', -1, 'an integer >= 1'),
    ('train.keep_checkpoints', 0, 'an integer >= 1'),
    ('train.batch_size', 0, 'an integer >= 1'),
    ('train.num_sample_images', 0, 'an integer >= 1'),
    ('evals.digits.every_steps', -1, 'an integer >= 0'),
    ('evals.digits.batch_size', 0, 'an integer >= 1'),
    ('evals.digits.num_samples', 0, 'an integer >= 1'),
    ('evals.digits.in_loop_num_samples', 0, 'an integer >= 1'),
    ('evals.bpd.num_examples', 0, 'None or an integer >= 1'),
    ('evals.bpd.every_steps', -1, 'an integer >= 0'),
    ('dataset.image_size', 0, 'an integer >= 1'),
    ('dataset.num_channels', 0, 'an integer >= 1'),
    ('dataset.shuffle_buffer_size', 0, 'an integer >= 1'),
    ('dataset.prefetch', 0, 'an integer >= 1'),
    ('diffusion.num_diffusion_timesteps', 0, 'an integer >= 1'),
    ('num_cpu_devices', 0, 'None or an integer >= 1'),
    ('model.num_res_blocks', -1, 'an integer >= 0'),
    ('model.dropout', 1.0, 'in [0, 1)'),
    ('optim.learning_rate', 0.0, '> 0'),
    ('optim.learning_rate', -1e-4, '> 0'),
    ('optim.eps', 0.0, '> 0'),
    ('optim.b1', 1.0, 'in [0, 1)'),
    ('optim.b2', -0.1, 'in [0, 1)'),
    ('optim.grad_clip', -1.0, '>= 0'),
    ('optim.warmup_steps', -1, 'an integer >= 0'),
    ('optim.ema_decay', 1.0, 'in [0, 1)'),
  ],
)
def test_out_of_range_fields_name_the_value_and_the_fix(field, value, bound):
  config = load_config('digits.py:tiny')
  *sections, name = field.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  message = problems_of(config, 'eval' if field.startswith('evals.') else 'train')
  assert f'{field}={value!r} must be {bound}: it is ' in message
  assert f'set --config.{field}=' in message


@pytest.mark.parametrize(
  'field, value, suggestion',
  [
    ('diffusion.beta_schedule', 'linaer', 'linear'),
    ('diffusion.model_mean_type', 'epsilon', 'eps'),
    ('diffusion.model_var_type', 'large', 'fixedlarge'),
    ('diffusion.loss_type', 'l2', 'mse'),
    ('optim.grad_clip_mode', 'device', 'per_device'),
    ('sample.method', 'ddpm', 'ddim'),
    ('evals.digits.type', 'digit', 'digits'),
  ],
)
def test_unknown_choices_list_the_choices(field, value, suggestion):
  config = load_config('digits.py:tiny')
  *sections, name = field.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  message = problems_of(config, 'eval' if field.startswith('evals.') else 'train')
  assert f'{field}={value!r} is not one of ' in message
  assert f'set --config.{field}={suggestion}.' in message


def test_model_dtype_must_be_a_float_type():
  config = load_config('digits.py:tiny')
  config.model.dtype = 'int8'
  assert "model.dtype='int8' is not a floating dtype name" in problems_of(config)
  config.model.dtype = 'bfloat16'
  assert problems_of(config) == ''


@pytest.mark.parametrize(
  'overrides, expected',
  [
    (dict(ch=48), 'model.ch=48 must be a positive multiple of 32'),
    (dict(ch=16, ch_mult=(2, 4)), 'set --config.model.ch=32'),
    (dict(ch_mult=(1, 2, 2, 2, 2)), 'the image size 8 is not divisible by 16'),
    (dict(ch_mult=(1, 2, 2, 2, 2)), 'use at most 4 levels for 8x8 images'),
    (dict(ch_mult=()), 'model.ch_mult=() must list a positive integer per level'),
    (dict(attn_resolutions=(3,)), '3 is not a feature-map size of this U-Net'),
    (dict(ch_mult=(1, 2), attn_resolutions=(8, 2)), 'over 2 levels: [8, 4]'),
    (dict(ch_mult=(1, 2), attn_resolutions=(8, 2)), '--config.model.attn_resolutions=(8,)'),
  ],
)
def test_the_unet_must_fit_the_images(overrides, expected):
  config = load_config('digits.py:tiny')
  config.model.update(overrides)
  assert expected in problems_of(config)


def test_model_fits_at_every_level():
  config = load_config('digits.py:tiny')
  config.model.update(ch=64, ch_mult=(1, 2, 2, 2), attn_resolutions=(8, 4, 2, 1))
  assert problems_of(config) == ''


@pytest.mark.parametrize(
  'schedule, beta_start, beta_end, ok',
  [
    ('linear', 0.5, 0.02, False),
    ('linear', 0.0, 0.02, False),
    ('quad', 1e-4, 1.5, False),
    ('warmup10', 1e-4, 0.02, True),
    ('const', 5.0, 0.5, True),  # const uses only beta_end
    ('const', 1e-4, 0.0, False),
    ('jsd', -1.0, -1.0, True),  # neither
    ('cosine', -1.0, -1.0, True),
  ],
)
def test_betas_are_checked_for_the_schedules_that_use_them(schedule, beta_start, beta_end, ok):
  config = load_config('digits.py:tiny')
  config.diffusion.update(beta_schedule=schedule, beta_start=beta_start, beta_end=beta_end)
  message = problems_of(config)
  assert (message == '') == ok, message
  if not ok:
    assert f'the {schedule} schedule needs 0 < ' in message
    assert '--config.diffusion.beta_end' in message


@pytest.mark.parametrize(
  'name, expected',
  [
    ('cifarr10', 'did you mean cifar10'),
    ('lsun_lmdb/bedrom', "lsun_lmdb has no config 'bedrom'; choose one of bedroom"),
    ('not a name', 'is not a TFDS name'),
  ],
)
def test_unknown_data_sets(name, expected):
  config = load_config('digits.py:tiny')
  config.dataset.name = name
  message = problems_of(config)
  assert f'dataset.name={name!r}' in message and expected in message


def test_a_data_set_prepared_by_an_unregistered_builder_is_accepted(tmp_path):
  config = load_config('digits.py:tiny', str(tmp_path))
  config.dataset.name = 'my_own_images'
  assert 'my_own_images' in problems_of(config)
  (tmp_path / 'my_own_images').mkdir()
  assert problems_of(config) == ''


def test_all_problems_come_in_one_error():
  config = load_config('digits.py:tiny')
  config.train.update(keep_checkpoints=0, checkpoint_every_steps=0, batch_size=0)
  config.model.update(ch=40, attn_resolutions=(3,))
  config.diffusion.beta_schedule = 'nope'
  message = problems_of(config)
  lines = message.splitlines()
  assert lines[0] == 'the config has 6 problems:' and len(lines) == 7
  for field in (
    'train.keep_checkpoints=0',
    'train.checkpoint_every_steps=0',
    'train.batch_size=0',
    'model.ch=40',
    'model.attn_resolutions=(3,)',
    "diffusion.beta_schedule='nope'",
  ):
    assert sum(line.startswith(f'  {field}') for line in lines) == 1, field


def test_train_and_eval_checks_run_only_where_they_apply():
  config = load_config('digits.py:tiny')
  config.train.batch_size = 12  # not divisible by the 8 devices of the tests
  assert 'train.batch_size=12 must be divisible by the 8 devices' in problems_of(config)
  assert problems_of(config, 'sample') == ''
  config = load_config('cifar10.py')  # the inception metric without its weights
  assert problems_of(config, 'train') == '' and problems_of(config, 'sample') == ''
  assert 'evals.fid.inception_path is not set' in problems_of(config, 'eval')
  config.evals.fid.every_steps = 1000  # in the loop: checked before training
  assert 'evals.fid.inception_path is not set' in problems_of(config, 'train')
  digits = load_config('digits.py:tiny')
  digits.dataset.name = 'cifar10'
  assert 'evals.digits.type="digits" scores only' in problems_of(digits, 'eval')


def test_evaluator_periods_must_be_multiples_of_steps_per_call():
  config = load_config('digits.py:tiny')
  config.train.update(steps_per_call=2)
  config.evals.digits.every_steps = 3
  assert 'evals.digits.every_steps=3 must be a multiple of' in problems_of(config)


def test_two_evaluators_of_one_type_are_refused():
  config = load_config('digits.py:tiny')
  config.evals.more = config.evals.digits.copy_and_resolve_references()
  assert "evals.more and evals.digits are both of type 'digits'" in problems_of(config, 'eval')


def test_steps_per_call_must_divide_the_periods():
  config = load_config('digits.py:tiny')
  config.train.steps_per_call = 3
  message = problems_of(config)
  assert 'train.num_train_steps=4 must be a multiple of train.steps_per_call=3' in message
  assert 'train.log_every_steps=2 must be a multiple' in message


def test_check_train_and_too_few_samples():
  config = load_config('digits.py:tiny')
  config.train.update(num_train_steps=5, steps_per_call=2)
  with pytest.raises(SetupError, match='multiple of train.steps_per_call'):
    validation.check_train(config)
  config = load_config('digits.py:tiny')
  config.evals.digits.num_samples = 1
  assert 'evals.digits.num_samples=1 is too small' in problems_of(config, 'eval')


# ----------------------------------------------------------------------------- workdir_config


def test_the_same_config_passes_and_tuples_equal_lists(tmp_path):
  config = load_config('digits.py')  # ch_mult, attn_resolutions: tuples, stored as JSON lists
  workdir_config.check(config, tmp_path, allow_change=False)  # no config.json: nothing to compare
  workdir_config.write(config, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['ch_mult'] == [1, 2]
  workdir_config.check(config, tmp_path, allow_change=False)


def test_model_changes_are_errors_and_the_rest_is_logged(tmp_path, caplog):
  workdir_config.write(load_config('digits.py'), tmp_path)
  config = load_config('digits.py')
  trained_steps = config.train.num_train_steps
  config.model.update(ch=64, ch_mult=(1, 2, 2))
  config.dataset.image_size = 16
  config.train.num_train_steps = 10
  config.evals.digits.num_samples = 100
  with pytest.raises(SetupError) as error:
    workdir_config.check(config, tmp_path, allow_change=False)
  message = str(error.value)
  for line in (
    f'model.ch: the run in {tmp_path} was trained with 32, the config asks for 64',
    'model.ch_mult: the run in ',
    'was trained with (1, 2), the config asks for (1, 2, 2)',
    'dataset.image_size: the run in ',
    'was trained with 8, the config asks for 16',
    '--config.model.ch=32 --config.model.ch_mult=(1,2)',
    '--allow_config_change',
  ):
    assert line in message
  assert 'num_train_steps' not in message
  with caplog.at_level(logging.INFO):
    workdir_config.check(config, tmp_path, allow_change=True)
  logged = caplog.text
  assert f'evals.digits.num_samples: 500 -> 100; train.num_train_steps: {trained_steps} -> 10' in (
    logged
  )
  assert 'As --allow_config_change allows' in logged and 'model.ch: the run' in logged


def test_an_unreadable_config_json(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": ')
  config = load_config('digits.py:tiny')
  with pytest.raises(SetupError, match='config.json is not the config a run writes'):
    workdir_config.check(config, tmp_path, allow_change=False)
  workdir_config.check(config, tmp_path, allow_change=True)


def test_a_converted_run_records_its_config(tmp_path):
  config = load_config('digits.py:tiny')
  params = Run.create(config).initial_state().params
  convert.write_checkpoint(tmp_path, config, params, params, step=0)
  workdir_config.check(config, tmp_path, allow_change=False)
  config.diffusion.num_diffusion_timesteps = 10
  with pytest.raises(SetupError, match='diffusion.num_diffusion_timesteps: the run in'):
    workdir_config.check(config, tmp_path, allow_change=False)


def test_workdirs_that_cannot_be_used(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(SetupError, match='is a file, not a folder'):
    workdir_config.check_writable(str(tmp_path / 'file'), create=True)
  with pytest.raises(SetupError, match=f'cannot be created: {tmp_path / "file"} is a file'):
    workdir_config.check_writable(str(tmp_path / 'file' / 'run'), create=False)
  workdir_config.check_writable(str(tmp_path / 'new'), create=False)
  assert not (tmp_path / 'new').exists()  # sample/eval: nothing made
  workdir_config.check_writable(str(tmp_path / 'new' / 'run'), create=True)
  assert list((tmp_path / 'new' / 'run').iterdir()) == []  # made, and the probe removed
  workdir_config.check_writable('gs://bucket/run', create=True)  # not probed
