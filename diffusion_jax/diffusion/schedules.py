"""Noise schedules: the β_t of Eq. 2 and iDDPM's respacing to fewer steps, in float64 numpy."""

from __future__ import annotations

import numpy as np

BETA_SCHEDULES = ('linear', 'quad', 'const', 'jsd', 'warmup10', 'warmup50', 'cosine')


def get_beta_schedule(
  kind: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
  """The β_t of Eq. 2 in float64 (paper: ``linear`` 1e-4..0.02, T=1000; ``cosine`` ignores both)."""
  n = num_diffusion_timesteps
  if n < 1:
    raise ValueError(f'num_diffusion_timesteps must be >= 1, got {n}.')
  if kind == 'linear':
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
  elif kind == 'quad':
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  elif kind == 'const':
    betas = beta_end * np.ones(n, dtype=np.float64)
  elif kind == 'jsd':
    betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)  # 1/T, 1/(T-1), ..., 1
  elif kind == 'warmup10':
    betas = _warmup(beta_start, beta_end, n, 0.1)
  elif kind == 'warmup50':
    betas = _warmup(beta_start, beta_end, n, 0.5)
  elif kind == 'cosine':
    betas = _cosine(n)
  else:
    raise ValueError(f'Unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}.')
  if not np.all((betas > 0) & (betas <= 1)):
    hint = f'check beta_start and beta_end (got {beta_start}, {beta_end})'
    raise ValueError(f'Betas of schedule {kind!r} must lie in (0, 1]; {hint}.')
  return betas


def _warmup(beta_start: float, beta_end: float, n: int, frac: float) -> np.ndarray:
  """Linear from β_start to β_end over the first ``frac`` of the n steps, then β_end."""
  warm = int(n * frac)
  return np.append(np.linspace(beta_start, beta_end, warm), np.full(n - warm, beta_end))


def _cosine(n: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's Eq. 17: ᾱ_t = cos²((t/T + s)/(1 + s) π/2), β_t clipped to ``max_beta``."""
  alphas_cumprod = np.cos((np.arange(n + 1, dtype=np.float64) / n + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """iDDPM's respaced steps t_i = round(i (T−1)/(k−1)), i = 0..k−1, of T = ``num_timesteps``.

  The stride is summed and rounded half to even, as improved-diffusion's
  ``space_timesteps(T, [k])`` does, so both pick the same steps."""
  if not 2 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in 2..{num_timesteps}, got {num_steps}.')
  stride = (num_timesteps - 1) / (num_steps - 1)
  positions = np.cumsum(np.append(0.0, np.full(num_steps - 1, stride)))
  return np.round(positions).astype(np.int64)


def respaced_betas(betas: np.ndarray, steps: np.ndarray) -> np.ndarray:
  """β'_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}} (ᾱ_{t_{−1}} = 1): the process on ``steps`` keeps ᾱ there.

  Float64 in and out; with every step kept, ``betas`` themselves, bit for bit."""
  if np.array_equal(steps, np.arange(betas.shape[0])):
    return betas
  alphas_cumprod = np.cumprod(1.0 - betas)[steps]
  return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
