"""Noise schedules, forward-process helpers and inference timesteps vs diffusers (PyTorch)."""

import numpy as np
import pytest

import jax.numpy as jnp

from fundax import diffusion

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# (beta_schedule, beta_start, beta_end): the DDPM paper, Stable Diffusion, Glide's cosine.
SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


def _config(beta_schedule, beta_start, beta_end, zero_snr=False):
  return dict(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
              beta_end=beta_end, rescale_betas_zero_snr=zero_snr)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_schedule_matches_diffusers(beta_schedule, beta_start, beta_end, zero_snr):
  config = _config(beta_schedule, beta_start, beta_end, zero_snr)
  ours = diffusion.make_schedule(**config)
  ref = diffusers.DDIMScheduler(**config)
  assert ours.betas.dtype == jnp.float32 and ours.betas.shape == (1000,)
  # diffusers rescales in float32, where 1 - alpha cancels and tiny alpha-bars lose digits
  # (feeding diffusers' own function our betas moves its result by as much); we rescale in
  # float64, so the rescaled schedules agree to float32 noise, the others to a few ulps.
  atol, rtol = (1e-5, 5e-5) if zero_snr else (1e-6, 1e-5)
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=atol)
  np.testing.assert_allclose(ours.alphas, ref.alphas.numpy(), rtol=0, atol=atol)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=rtol, atol=1e-6)
  if zero_snr:
    assert float(ours.alphas_cumprod[-1]) == 0.0
    assert float(diffusion.snr(ours, 999)) == 0.0


def test_zero_snr_matches_diffusers_rescale_function():
  from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
  base = diffusion.make_schedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  rescaled = diffusion.make_schedule(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012, rescale_betas_zero_snr=True)
  ref_betas = rescale_zero_terminal_snr(torch.from_numpy(np.array(base.betas)))
  ref_abar = torch.cumprod(1 - ref_betas, 0).numpy()
  np.testing.assert_allclose(rescaled.alphas_cumprod, ref_abar, rtol=5e-5, atol=1e-6)
  # The rescale keeps the first alpha-bar and only changes the schedule, not its length.
  np.testing.assert_allclose(rescaled.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-6)


def test_schedule_from_config_ignores_scheduler_only_keys():
  config = dict(_config("scaled_linear", 0.00085, 0.012), clip_sample=False, steps_offset=1,
                set_alpha_to_one=False, prediction_type="epsilon", _class_name="DDIMScheduler")
  schedule = diffusion.make_schedule_from_config(config)
  np.testing.assert_array_equal(schedule.final_alpha_cumprod, schedule.alphas_cumprod[0])
  assert float(diffusion.make_schedule().final_alpha_cumprod) == 1.0
  with pytest.raises(ValueError, match="beta_schedule"):
    diffusion.make_schedule(beta_schedule="sigmoid")


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule, beta_start, beta_end):
  config = _config(beta_schedule, beta_start, beta_end)
  schedule = diffusion.make_schedule(**config)
  ref = diffusers.DDPMScheduler(**config)
  rng = np.random.default_rng(0)
  x0, noise = rng.standard_normal((2, 2, 4, 4, 3), dtype=np.float32)
  t = np.array([3, 987])
  args = [torch.from_numpy(a) for a in (x0, noise, t)]
  np.testing.assert_allclose(diffusion.add_noise(schedule, x0, noise, t),
                             ref.add_noise(*args).numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(diffusion.velocity(schedule, x0, noise, t),
                             ref.get_velocity(*args).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pred_x0_and_eps_invert_the_forward_process(prediction_type):
  schedule = diffusion.make_schedule(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012)
  x0, noise = np.random.default_rng(0).standard_normal((2, 3, 4, 4, 2), dtype=np.float32)
  t = jnp.array([0, 500, 999])
  x_t = diffusion.add_noise(schedule, x0, noise, t)
  target = {"epsilon": noise, "sample": x0,
            "v_prediction": diffusion.velocity(schedule, x0, noise, t)}[prediction_type]
  pred_x0, pred_eps = diffusion.pred_x0_and_eps(schedule, target, x_t, t, prediction_type)
  # x0 from eps divides by sqrt(alpha-bar) (~0.07 at t=999), so allow for that amplification.
  np.testing.assert_allclose(pred_x0, x0, atol=1e-4)
  np.testing.assert_allclose(pred_eps, noise, atol=1e-4)
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion.pred_x0_and_eps(schedule, target, x_t, t, "flow")


def test_snr_is_alpha_bar_ratio_and_decreasing():
  schedule = diffusion.make_schedule()
  t = jnp.arange(1000)
  s = diffusion.snr(schedule, t)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  np.testing.assert_allclose(s, abar / (1 - abar), rtol=1e-4)
  assert np.all(np.diff(np.asarray(s)) < 0)


# (scheduler, diffusers class, spacing, steps_offset)
TIMESTEP_CASES = [
    ("ddpm", "DDPMScheduler", None, 0),
    ("ddpm", "DDPMScheduler", "leading", 1),
    ("ddpm", "DDPMScheduler", "trailing", 0),
    ("ddpm", "DDPMScheduler", "linspace", 0),
    ("ddim", "DDIMScheduler", None, 0),
    ("ddim", "DDIMScheduler", "leading", 1),
    ("ddim", "DDIMScheduler", "trailing", 0),
    ("ddim", "DDIMScheduler", "linspace", 0),
    ("dpm_solver", "DPMSolverMultistepScheduler", None, 0),
    ("dpm_solver", "DPMSolverMultistepScheduler", "leading", 1),
    ("dpm_solver", "DPMSolverMultistepScheduler", "trailing", 0),
]


@pytest.mark.parametrize("sampler,cls,spacing,offset", TIMESTEP_CASES)
def test_timesteps_match_diffusers_set_timesteps(sampler, cls, spacing, offset):
  kwargs = {"steps_offset": offset}
  if spacing is not None:
    kwargs["timestep_spacing"] = spacing
  ref = getattr(diffusers, cls)(**kwargs)
  for num_steps in (1, 7, 20, 50, 999):
    ref.set_timesteps(num_steps)
    ts, prev = diffusion.make_timesteps(sampler, num_steps, 1000, timestep_spacing=spacing,
                                        steps_offset=offset)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    assert ts.dtype == np.int32 and prev.shape == ts.shape
    if sampler == "ddim":
      np.testing.assert_array_equal(prev, ts - 1000 // num_steps)
    elif sampler == "ddpm":
      np.testing.assert_array_equal(prev, [int(ref.previous_timestep(t)) for t in ref.timesteps])


def test_make_timesteps_rejects_bad_arguments():
  with pytest.raises(ValueError, match="sampler"):
    diffusion.make_timesteps("euler", 10)
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.make_timesteps("ddim", 1001)
  with pytest.raises(ValueError, match="spacing"):
    diffusion.make_timesteps("ddim", 10, timestep_spacing="karras")
