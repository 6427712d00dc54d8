"""The PyTorch peer: diffusers' ``UNet2DModel`` configured as the project's U-Nets, timed alone.

Runs under the peer's own Python (``benchmarks/requirements.txt`` in a separate venv); imports
only torch, diffusers and numpy, never ``diffusion_jax``. The benchmarks start it as a
subprocess and read the JSON object it prints last:

  PEER/bin/python benchmarks/peer.py --model=cifar10 --mode=train --batch=32 --steps=3
  PEER/bin/python benchmarks/peer.py --model=cifar10 --mode=sample --batch=64 --steps=3

``train``: seconds per training step as the project's step does it (q_sample with random t and
noise, the ε-MSE loss, backward, global-norm clipping at 1.0, Adam, EMA), after one warm-up step.
``sample``: seconds per reverse step of ``DDPMScheduler.step`` with the model's forward pass,
after one warm-up step. ``forward``: seconds per eval-mode forward pass (no grad).
"""

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

# google/ddpm-cifar10-32's config.json (35,746,307 parameters), written out: no download.
CIFAR10 = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  layers_per_block=2,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  attention_head_dim=None,
  norm_num_groups=32,
  norm_eps=1e-6,
  act_fn='silu',
  time_embedding_type='positional',
  flip_sin_to_cos=False,
  freq_shift=1,
  downsample_padding=0,
  center_input_sample=False,
  mid_block_scale_factor=1,
  dropout=0.1,
)
# configs/digits.py's U-Net: ch 32, ch_mult (1, 2), 1 block per level, attention at 4x4, 8x8x1.
DIGITS = dict(
  CIFAR10,
  sample_size=8,
  in_channels=1,
  out_channels=1,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
  up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
  dropout=0.0,
)
MODELS = {'cifar10': (CIFAR10, 1000), 'digits': (DIGITS, 200)}  # config, diffusion steps T


def build(name: str) -> tuple[UNet2DModel, int]:
  config, timesteps = MODELS[name]
  torch.manual_seed(0)
  return UNet2DModel(**config), timesteps


def time_train(model: UNet2DModel, timesteps: int, batch: int, steps: int) -> list[float]:
  """Seconds of each of ``steps`` train steps (after one warm-up step)."""
  size, channels = model.config.sample_size, model.config.in_channels
  betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
  sqrt_ab = torch.cumprod(1 - betas, 0).sqrt().float()
  sqrt_1m_ab = (1 - torch.cumprod(1 - betas, 0)).sqrt().float()
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
  ema = copy.deepcopy(model).requires_grad_(False)
  images = torch.rand(batch, channels, size, size) * 2 - 1
  model.train()

  def step():
    t = torch.randint(0, timesteps, (batch,))
    noise = torch.randn_like(images)
    x_t = sqrt_ab[t, None, None, None] * images + sqrt_1m_ab[t, None, None, None] * noise
    loss = torch.mean((model(x_t, t).sample - noise) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)
    return loss.detach().item()

  return _timed(step, steps)


def time_sample(model: UNet2DModel, timesteps: int, batch: int, steps: int) -> list[float]:
  """Seconds of each of ``steps`` reverse steps (forward pass + ``DDPMScheduler.step``)."""
  scheduler = DDPMScheduler(num_train_timesteps=timesteps, variance_type='fixed_large')
  scheduler.set_timesteps(timesteps)
  size, channels = model.config.sample_size, model.config.in_channels
  model.eval()
  state = {'x': torch.randn(batch, channels, size, size), 'i': 0}
  generator = torch.Generator().manual_seed(0)

  def step():
    t = scheduler.timesteps[state['i'] % timesteps]
    with torch.no_grad():
      eps = model(state['x'], t).sample
    state['x'] = scheduler.step(eps, t, state['x'], generator=generator).prev_sample
    state['i'] += 1

  return _timed(step, steps)


def time_forward(model: UNet2DModel, timesteps: int, batch: int, steps: int) -> list[float]:
  size, channels = model.config.sample_size, model.config.in_channels
  x, t = torch.randn(batch, channels, size, size), torch.randint(0, timesteps, (batch,))
  model.eval()

  def step():
    with torch.no_grad():
      model(x, t)

  return _timed(step, steps)


def _timed(fn, steps: int) -> list[float]:
  fn()  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='cifar10')
  parser.add_argument('--mode', choices=('train', 'sample', 'forward'), default='train')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  model, timesteps = build(args.model)
  fn = {'train': time_train, 'sample': time_sample, 'forward': time_forward}[args.mode]
  times = fn(model, timesteps, args.batch, args.steps)
  print(
    json.dumps(
      dict(
        seconds=statistics.median(times),
        times=times,
        params=sum(p.numel() for p in model.parameters()),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
      )
    )
  )


if __name__ == '__main__':
  np.random.seed(0)
  main()
