"""Shared config defaults: the paper's settings (Ho et al. 2020, Appendix B) for a 32x32 model.

The config files of the top-level ``configs/`` folder start from these.
"""

import importlib.util
import pathlib

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # On a CPU-only host: split it into this many JAX devices (data parallel). One per core is the
  # fastest measured (2 on a 2-core machine: 1.17x the CIFAR10 step of one device, BENCHMARKS.md).
  # None keeps JAX's default of one. Applied by main.py before JAX starts; ignored on TPU/GPU.
  config.num_cpu_devices = ml_collections.FieldReference(2, field_type=int)

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'cifar10'  # a TFDS name, e.g. 'lsun/bedroom', 'celeb_a_hq/256'
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS dir; may be gs://
  config.dataset.download = False  # never let an offline machine hang on retries
  config.dataset.train_split = 'train'
  # The held-out split (bits/dim); None if the data set has none.
  config.dataset.eval_split = ml_collections.config_dict.placeholder(str)
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 32
  config.dataset.num_channels = 3
  config.dataset.random_flip = True
  config.dataset.center_crop = False  # LSUN: center crop to a square, then resize
  config.dataset.shuffle_buffer_size = 50_000
  config.dataset.prefetch = 2
  config.dataset.label_key = 'label'  # the class feature (class-conditional models only)

  config.model = ml_collections.ConfigDict()
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.resamp_with_conv = True
  config.model.dtype = 'float32'  # 'bfloat16' on TPU: bf16 compute, f32 params
  # Recompute each ResNet/attention block in the backward pass: less activation memory, ~1/3 more
  # compute; same parameters and outputs. Fits the 256x256 model into a TPU core (BENCHMARKS.md).
  config.model.remat = False
  # Class-conditional (Ho & Salimans 2021): the number of classes of dataset.label_key, whose
  # embedding is added to the time embedding; None: the paper's unconditional U-Net.
  config.model.num_classes = ml_collections.config_dict.placeholder(int)

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.beta_schedule = 'linear'
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.num_diffusion_timesteps = 1000
  config.diffusion.model_mean_type = 'eps'
  config.diffusion.model_var_type = 'fixedlarge'
  config.diffusion.loss_type = 'mse'

  # How samples are drawn (grids, --mode=sample, evaluation): 'ancestral' (Algorithm 2; on
  # num_steps respaced steps if set), 'ddim' (Song et al. 2021, eta=0 deterministic) or
  # 'dpm_solver++' (Lu et al. 2022, 2M; 10-20 steps); x̂_0 clipped to [-1, 1] at every step if
  # clip_denoised.
  config.sample = ml_collections.ConfigDict()
  config.sample.method = 'ancestral'
  config.sample.num_steps = ml_collections.config_dict.placeholder(int)  # None: all T steps
  config.sample.eta = 0.0
  config.sample.clip_denoised = True
  # Class-conditional models: classifier-free guidance w (ε̃ = (1 + w) ε(x, c) − w ε(x, ∅)) and the
  # classes to sample: () spreads them evenly (sample i is class i mod num_classes), (c,) is one
  # class for all, (c0, c1, ...) a class per sample, cycled.
  config.sample.guidance = 0.0
  config.sample.labels = ()

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.grad_clip = 1.0
  # The original clipped each core's gradient before the cross-core sum ('per_device');
  # 'global' clips the averaged gradient instead.
  config.optim.grad_clip_mode = 'per_device'
  config.optim.ema_decay = 0.9999

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # global, over all devices of all hosts
  config.train.num_train_steps = 800_000
  # Optimizer steps per host call (a lax.scan; unrolled on XLA:CPU); the periods below must be
  # multiples of it. None: 10 on TPU/GPU (less host work per step, BENCHMARKS.md), 1 on a CPU.
  config.train.steps_per_call = ml_collections.config_dict.placeholder(int)
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 10_000
  config.train.keep_checkpoints = 3
  # Also a checkpoint every this many minutes of wall time (at a log step), so that a VM taken
  # back loses at most that much; None: 30 on TPU/GPU, none on a CPU; 0: none.
  config.train.checkpoint_every_minutes = ml_collections.config_dict.placeholder(float)
  config.train.sample_every_steps = 50_000
  config.train.num_sample_images = 64  # the sample grid
  # Class-conditional models: the fraction of examples trained with the null class instead of
  # theirs (the unconditional model that guidance needs).
  config.train.p_uncond = 0.1
  # Trace this many optimizer steps (from the second of each process on) into the workdir for
  # TensorBoard's profile plugin (docs/cloud_tpu.md); 0: no trace.
  config.train.profile_steps = 0
  # Deprecated: sample.clip_denoised (None: not set; a value is moved there with a warning).
  config.train.clip_denoised = ml_collections.config_dict.placeholder(bool)

  # Evaluators by name: `type` picks the plug-in (diffusion_jax/evaluators: inception, digits,
  # bound), `every_steps` its period in the train loop (0: only --mode=eval); the other fields
  # are the type's own (docs/evaluation.md). --mode=eval runs every one of them.
  config.evals = ml_collections.ConfigDict()
  config.evals.fid = inception_eval()
  config.evals.bpd = bound_eval()
  # Deprecated: the single eval section of earlier releases. A field set here (not None) is
  # moved into `evals` with a warning (diffusion_jax/config_compat.py).
  config.eval = ml_collections.ConfigDict(
    {name: ml_collections.config_dict.placeholder(kind) for name, kind in LEGACY_EVAL.items()}
  )
  return config


# The fields of the deprecated `eval` section and their types.
LEGACY_EVAL = {
  'metrics': str,
  'num_samples': int,
  'batch_size': int,
  'every_steps': int,
  'in_loop_num_samples': int,
  'inception_path': str,
  'reference_split': str,
  'reference_dir': str,
  'reference_num_examples': int,
  'nll_split': str,
  'nll_num_examples': int,
}


def sample_eval(kind: str) -> ml_collections.ConfigDict:
  """A sample evaluator's settings (``inception`` or ``digits``): scores EMA samples against
  the statistics of a real split."""
  return ml_collections.ConfigDict(
    dict(
      type=kind,
      every_steps=0,  # the period in the train loop; 0: only --mode=eval
      num_samples=50_000,  # --mode=eval, as the paper
      in_loop_num_samples=2048,  # as the original's 256x256 runs
      batch_size=256,  # global samples per sampling call
      # The real images: the first reference_num_examples (None: all) of reference_split. The
      # paper's CIFAR10 FID 3.17 is against train (5.24 test); its LSUN FIDs use 50,000 train
      # images through StyleGAN2's code.
      reference_split='train',
      reference_num_examples=ml_collections.config_dict.placeholder(int),
      # Where reference statistics are cached; None: <workdir>/fid_stats (inception),
      # <data_dir>/sklearn_digits_classifier (digits, with its classifier).
      reference_dir=ml_collections.config_dict.placeholder(str),
    )
  )


def inception_eval() -> ml_collections.ConfigDict:
  """FID and IS with the FID Inception (its weights: a converted .npz, docs/evaluation.md)."""
  config = sample_eval('inception')
  config.inception_path = ml_collections.config_dict.placeholder(str)
  return config


def bound_eval() -> ml_collections.ConfigDict:
  """The variational bound in bits/dim (Eq. 5) on a held-out split, with its per-t terms."""
  return ml_collections.ConfigDict(
    dict(
      type='bound',
      every_steps=0,
      split=ml_collections.config_dict.placeholder(str),  # None: dataset.eval_split
      num_examples=ml_collections.config_dict.placeholder(int),  # None: the whole split
      batch_size=256,  # the global batch of images
    )
  )


def get_256_config(
  dataset: str, *, num_train_steps: int, random_flip: bool
) -> ml_collections.ConfigDict:
  """The paper's 256x256 model (114M params) and optimizer settings on a TFDS dataset."""
  config = get_config()
  config.dataset.name = dataset
  config.dataset.image_size = 256
  config.dataset.random_flip = random_flip
  config.dataset.center_crop = dataset.startswith(('lsun/', 'lsun_lmdb/'))
  config.dataset.shuffle_buffer_size = 10_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.diffusion.model_var_type = 'fixedsmall'
  config.optim.learning_rate = 2e-5
  config.train.batch_size = 64
  config.train.num_train_steps = num_train_steps
  config.train.checkpoint_every_steps = 5_000
  config.train.num_sample_images = 16
  if dataset.startswith(('lsun/', 'lsun_lmdb/')):
    config.evals.fid.reference_num_examples = 50_000  # the paper's LSUN FID protocol
  # LSUN's scenes have train and validation splits, its objects (cat) and CelebA-HQ only train;
  # the paper reports no NLL for either: no bound there.
  config.dataset.eval_split = (
    'validation' if dataset.endswith(('bedroom', 'church_outdoor')) else None
  )
  if config.dataset.eval_split is None:
    del config.evals['bpd']
  return config


def load(spec: str) -> ml_collections.ConfigDict:
  """A config file as ``--config`` reads it: ``configs/digits.py`` or ``configs/digits.py:tiny``."""
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  if module_spec is None:
    raise FileNotFoundError(f'No config file at {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()
