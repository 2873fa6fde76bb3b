"""Diffusion maths: noise schedules, reverse-process steps with exact log-probs, and samplers.

Everything here is a pure function over arrays, weight-compatible in its numerics with
diffusers' DDPM, DDIM and DPMSolverMultistep schedulers. Samplers are looked up by name in
`registry` (importing this package registers the built-in ones).
"""

from fundax.diffusion.dpm_solver import dpm_sigma_at
from fundax.diffusion.dpm_solver import dpm_solver_step
from fundax.diffusion.registry import Sampler
from fundax.diffusion.registry import get_sampler
from fundax.diffusion.registry import register_sampler
from fundax.diffusion.registry import sampler_names
from fundax.diffusion.samplers import Trajectory
from fundax.diffusion.samplers import guided_model_output
from fundax.diffusion.samplers import make_timesteps
from fundax.diffusion.samplers import sample_loop
from fundax.diffusion.schedules import Schedule
from fundax.diffusion.schedules import add_noise
from fundax.diffusion.schedules import alpha_cumprod_at
from fundax.diffusion.schedules import make_schedule
from fundax.diffusion.schedules import make_schedule_from_config
from fundax.diffusion.schedules import pred_x0_and_eps
from fundax.diffusion.schedules import snr
from fundax.diffusion.schedules import velocity
from fundax.diffusion.steps import ddim_moments
from fundax.diffusion.steps import ddim_step
from fundax.diffusion.steps import ddpm_moments
from fundax.diffusion.steps import ddpm_step
from fundax.diffusion.steps import gaussian_log_prob
