"""Reverse-diffusion steps and the scan sampling loop: diffusers parity, log-probs, tracing."""

import functools

import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp

from fundax import diffusion

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 4, 3)  # [B, h, w, c]
PARITY_ATOL = 1e-5

# (name, schedule config, timestep spacing, prediction types): Stable Diffusion's schedule with
# its leading+offset spacing, the DDPM paper's, Glide's cosine, and zero terminal SNR (which is
# meant for v-prediction with trailing spacing, as t=999 has alpha-bar 0).
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PARITY_CASES = [
    ("scaled_linear", SD, dict(timestep_spacing="leading", steps_offset=1), "epsilon"),
    ("scaled_linear", SD, dict(timestep_spacing="leading", steps_offset=1), "v_prediction"),
    ("linear", dict(beta_schedule="linear"), {}, "epsilon"),
    ("linear", dict(beta_schedule="linear"), {}, "v_prediction"),
    ("cosine", dict(beta_schedule="squaredcos_cap_v2"), {}, "epsilon"),
    ("cosine", dict(beta_schedule="squaredcos_cap_v2"), {}, "v_prediction"),
    ("zero_snr", dict(SD, rescale_betas_zero_snr=True), dict(timestep_spacing="trailing"),
     "v_prediction"),
]
PARITY_IDS = [f"{name}-{pred}" for name, _, _, pred in PARITY_CASES]


def _assert_parity(got, expected, atol=PARITY_ATOL):
  """max |got - expected| <= atol, relative to the output's scale where that exceeds 1.

  Glide's cosine schedule has alpha-bar 2.4e-9 at t=999, so an epsilon model's x0 (and the
  step output) reaches ~1e4 on random inputs, where one float32 ulp is ~1e-3.
  """
  expected = np.asarray(expected)
  scale = max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(np.asarray(got) - expected).max())
  assert err <= atol * scale, f"max abs diff {err:.3g} at output scale {scale:.3g}"


def _random_inputs(rng):
  """A fresh (model_output, sample) pair as numpy arrays and torch tensors."""
  arrays = rng.standard_normal((2,) + SHAPE, dtype=np.float32)
  return arrays[0], arrays[1], torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1])


# eta = 1 on the zero-SNR schedule: 1 - abar_prev - std^2 at its first step is 0 in exact
# arithmetic and +-6e-8 in float32, which once made the step (and RLHF rollouts) NaN. fundax
# clamps it to 0; diffusers keeps the rounding residue, whose square root (up to 2.5e-4,
# sqrt of float32 epsilon) scales the predicted noise: parity within that there.
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("name,sched,spacing,prediction_type", PARITY_CASES, ids=PARITY_IDS)
def test_ddim_step_matches_diffusers(name, sched, spacing, prediction_type, eta):
  del name
  # set_alpha_to_one=False as in the Stable Diffusion configs, so the last step is stochastic.
  ref = diffusers.DDIMScheduler(**sched, **spacing, prediction_type=prediction_type,
                                clip_sample=False, set_alpha_to_one=False)
  schedule = diffusion.make_schedule(**sched, set_alpha_to_one=False)
  ref.set_timesteps(10)
  ts, prev_ts = diffusion.make_timesteps("ddim", 10, **spacing)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  rng = np.random.default_rng(1)
  for t, t_prev in zip(ts, prev_ts):
    out, x, out_pt, x_pt = _random_inputs(rng)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    expected = ref.step(out_pt, int(t), x_pt, eta=eta, variance_noise=torch.from_numpy(noise))
    got, log_prob = diffusion.ddim_step(schedule, out, t, t_prev, x, eta, noise=noise,
                                        prediction_type=prediction_type)
    _assert_parity(got, expected.prev_sample.numpy(), PARITY_ATOL if eta < 1 else 3e-4)
    assert np.all(np.isfinite(got))
    assert log_prob.shape == (SHAPE[0],) and np.all(np.isfinite(log_prob))


@pytest.mark.parametrize("name,sched,spacing,prediction_type", PARITY_CASES, ids=PARITY_IDS)
def test_ddpm_step_matches_diffusers(name, sched, spacing, prediction_type):
  del name
  ref = diffusers.DDPMScheduler(**sched, **spacing, prediction_type=prediction_type,
                                clip_sample=False)
  schedule = diffusion.make_schedule(**sched)
  ref.set_timesteps(10)
  ts, prev_ts = diffusion.make_timesteps("ddpm", 10, **spacing)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  rng = np.random.default_rng(2)
  for i, (t, t_prev) in enumerate(zip(ts, prev_ts)):
    out, x, out_pt, x_pt = _random_inputs(rng)
    # diffusers draws the step noise as torch.randn from the generator; draw the same here.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).numpy()
    expected = ref.step(out_pt, int(t), x_pt, generator=torch.Generator().manual_seed(i))
    got, _ = diffusion.ddpm_step(schedule, out, t, t_prev, x, noise=noise,
                                 prediction_type=prediction_type)
    _assert_parity(got, expected.prev_sample.numpy())


@pytest.mark.parametrize("num_steps", [8, 16])
@pytest.mark.parametrize("name,sched,spacing,prediction_type", PARITY_CASES, ids=PARITY_IDS)
def test_dpm_solver_multistep_matches_diffusers(name, sched, spacing, prediction_type, num_steps):
  del name, spacing  # DPM-Solver's own default spacing ("linspace") reaches t=999 for zero SNR.
  ref = diffusers.DPMSolverMultistepScheduler(**sched, prediction_type=prediction_type)
  schedule = diffusion.make_schedule(**sched)
  ref.set_timesteps(num_steps)
  ts, prev_ts = diffusion.make_timesteps("dpm_solver", num_steps)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  rng = np.random.default_rng(3)
  prev_x0, t_last = np.zeros(SHAPE, np.float32), ts[0]
  for i, (t, t_prev) in enumerate(zip(ts, prev_ts)):
    # Fresh inputs every step: the history (previous x0 prediction) must carry over exactly.
    out, x, out_pt, x_pt = _random_inputs(rng)
    expected = ref.step(out_pt, int(t), x_pt).prev_sample.numpy()
    second_order = 0 < i < num_steps - 1
    got, prev_x0 = diffusion.dpm_solver_step(schedule, out, t, t_prev, x, prev_x0, t_last,
                                             second_order, prediction_type)
    t_last = t
    _assert_parity(got, expected)


def _sd_schedule(**kwargs):
  return diffusion.make_schedule(**SD, **kwargs)


@pytest.mark.parametrize("step", ["ddim", "ddpm"])
def test_log_prob_of_own_sample_matches_scipy_and_peaks_at_mean(step):
  schedule = _sd_schedule(set_alpha_to_one=False)
  k_out, k_x, k_step = jax.random.split(jax.random.key(0), 3)
  out = jax.random.normal(k_out, SHAPE)
  x = jax.random.normal(k_x, SHAPE)
  t, t_prev, eta = 501, 401, 0.8
  if step == "ddim":
    fn = functools.partial(diffusion.ddim_step, schedule, out, t, t_prev, x, eta)
    mean, std, _ = diffusion.ddim_moments(schedule, out, t, t_prev, x, eta)
  else:
    fn = functools.partial(diffusion.ddpm_step, schedule, out, t, t_prev, x)
    mean, std, _ = diffusion.ddpm_moments(schedule, out, t, t_prev, x)
  sample, log_prob = fn(key=k_step)
  expected = scipy.stats.norm.logpdf(np.asarray(sample, np.float64), np.asarray(mean),
                                     float(std)).reshape(SHAPE[0], -1).sum(-1)
  np.testing.assert_allclose(log_prob, expected, rtol=1e-5)
  # Scoring the sample it drew gives back the same log-prob (the DDPO importance ratio is 1).
  _, rescored = fn(prev_sample=sample)
  np.testing.assert_allclose(rescored, log_prob, rtol=1e-6)
  # The density peaks at the mean, and moving away lowers it.
  _, at_mean = fn(prev_sample=mean)
  _, off_mean = fn(prev_sample=mean + 0.1 * std)
  assert np.all(at_mean > log_prob) and np.all(at_mean > off_mean)
  with pytest.raises(ValueError, match="exactly one"):
    fn(key=k_step, prev_sample=sample)


def test_steps_accept_per_example_timesteps():
  # DDPO re-scores shuffled (timestep, sample) pairs, so a batch may mix timesteps.
  schedule = _sd_schedule(set_alpha_to_one=False)
  rng = np.random.default_rng(4)
  out, x, noise = rng.standard_normal((3,) + SHAPE, dtype=np.float32)
  t, t_prev = np.array([801, 1]), np.array([701, -99])
  steps = [functools.partial(diffusion.ddim_step, eta=0.9), diffusion.ddpm_step]
  for step in steps:
    both, both_lp = step(schedule, out, t, t_prev, x, noise=noise)
    for i in range(SHAPE[0]):
      one, one_lp = step(schedule, out[i:i + 1], t[i], t_prev[i], x[i:i + 1], noise=noise[i:i + 1])
      np.testing.assert_allclose(both[i:i + 1], one, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(both_lp[i:i + 1], one_lp, rtol=1e-6)
  prev_x0 = rng.standard_normal(SHAPE, dtype=np.float32)
  both, _ = diffusion.dpm_solver_step(schedule, out, t, t_prev, x, prev_x0, t + 100, True)
  for i in range(SHAPE[0]):
    one, _ = diffusion.dpm_solver_step(schedule, out[i:i + 1], t[i], t_prev[i], x[i:i + 1],
                                       prev_x0[i:i + 1], t[i] + 100, True)
    np.testing.assert_allclose(both[i:i + 1], one, rtol=1e-6, atol=1e-6)


def test_deterministic_steps_have_zero_log_prob_and_finite_gradients():
  schedule = _sd_schedule(set_alpha_to_one=True)
  out = jax.random.normal(jax.random.key(1), SHAPE)
  x = jax.random.normal(jax.random.key(2), SHAPE)

  def score(model_output, eta, t, t_prev):
    prev, _ = diffusion.ddim_step(schedule, model_output, t, t_prev, x, eta, key=jax.random.key(3))
    return diffusion.ddim_step(schedule, model_output, t, t_prev, x, eta,
                               prev_sample=jax.lax.stop_gradient(prev))[1].sum()

  # eta = 0 anywhere, and eta > 0 on the last step with set_alpha_to_one (alpha-bar_prev = 1).
  for eta, t, t_prev in [(0.0, 501, 401), (1.0, 1, -99)]:
    assert float(score(out, eta, t, t_prev)) == 0.0
    assert np.all(np.isfinite(jax.grad(score)(out, eta, t, t_prev)))
  assert float(score(out, 1.0, 501, 401)) != 0.0
  assert np.any(jax.grad(score)(out, 1.0, 501, 401) != 0)


def test_stochastic_ddim_from_zero_terminal_snr_is_finite():
  # At t = 999 of a zero-SNR schedule, 1 - abar_prev - std^2 is 0 exactly and rounds below 0
  # in float32 for some step counts (13, 14, 19, 20, 23 to 25 among 2 to 59): those were NaN.
  schedule = diffusion.make_schedule(**SD, rescale_betas_zero_snr=True, set_alpha_to_one=False)
  x = np.ones((1, 2, 2, 1), np.float32)
  for num_steps in (13, 20, 25):
    ts, prev_ts = diffusion.make_timesteps("ddim", num_steps, timestep_spacing="trailing")
    got, log_prob = diffusion.ddim_step(schedule, x, ts[0], prev_ts[0], x, 1.0, noise=x,
                                        prediction_type="v_prediction")
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(log_prob)), num_steps


def _toy_denoiser(x, t, emb):
  """A cheap pure denoiser that depends on x, t and the conditioning. emb: [B, L, D]."""
  scale = jnp.sin(t.astype(jnp.float32) / 300.0)[:, None, None, None]
  return 0.3 * x + scale * emb.mean(axis=(1, 2))[:, None, None, None]


def _conditioning():
  cond = jax.random.normal(jax.random.key(10), (SHAPE[0], 8, 16))
  return cond, jnp.zeros_like(cond)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.6), ("ddpm", 1.0), ("dpm_solver", 0.0)])
def test_scan_loop_equals_python_loop_of_steps(sampler, eta):
  schedule = _sd_schedule(set_alpha_to_one=False)
  cond, uncond = _conditioning()
  x_T = jax.random.normal(jax.random.key(4), SHAPE)
  key, num_steps, w = jax.random.key(5), 5, 4.0
  final, traj = jax.jit(functools.partial(
      diffusion.sample_loop, _toy_denoiser, sampler=sampler, num_steps=num_steps,
      return_trajectory=True, steps_offset=1))(schedule, x_T, cond, uncond, key,
                                              guidance_scale=w, eta=eta)
  assert traj.latents.shape == (num_steps + 1,) + SHAPE
  assert traj.log_probs.shape == (num_steps, SHAPE[0])
  # The reference: a Python loop over the public step functions with the same per-step keys.
  ts, prev_ts = diffusion.make_timesteps(sampler, num_steps, steps_offset=1)
  np.testing.assert_array_equal(traj.timesteps, ts)
  x, prev_x0, log_probs = x_T, jnp.zeros(SHAPE), []
  for i, (t, t_prev) in enumerate(zip(ts, prev_ts)):
    out = diffusion.guided_model_output(_toy_denoiser, x, t, cond, uncond, w)
    rng = jax.random.fold_in(key, i)
    if sampler == "ddim":
      x, lp = diffusion.ddim_step(schedule, out, t, t_prev, x, eta, key=rng)
    elif sampler == "ddpm":
      x, lp = diffusion.ddpm_step(schedule, out, t, t_prev, x, key=rng)
    else:
      t_last = ts[max(i - 1, 0)]
      x, prev_x0 = diffusion.dpm_solver_step(schedule, out, t, t_prev, x, prev_x0, t_last,
                                             0 < i < num_steps - 1)
      lp = jnp.zeros(SHAPE[0])
    np.testing.assert_allclose(traj.latents[i + 1], x, atol=1e-5)
    log_probs.append(lp)
  np.testing.assert_allclose(final, x, atol=1e-5)
  np.testing.assert_allclose(traj.log_probs, np.stack(log_probs), rtol=1e-5, atol=1e-3)
  if sampler != "dpm_solver":
    # Re-scoring the stored trajectory (what DDPO's update does) reproduces the log-probs.
    out = diffusion.guided_model_output(_toy_denoiser, traj.latents[2], ts[2], cond, uncond, w)
    step = (functools.partial(diffusion.ddim_step, eta=eta) if sampler == "ddim"
            else diffusion.ddpm_step)
    _, lp = step(schedule, out, ts[2], prev_ts[2], traj.latents[2], prev_sample=traj.latents[3])
    np.testing.assert_allclose(lp, traj.log_probs[2], rtol=1e-5)


def test_guidance_scale_and_eta_changes_do_not_retrace():
  schedule = _sd_schedule()
  cond, uncond = _conditioning()
  x_T = jax.random.normal(jax.random.key(6), SHAPE)
  traces = []

  @jax.jit
  def run(guidance_scale, eta):
    traces.append(1)  # Runs once per trace, never per call.
    return diffusion.sample_loop(_toy_denoiser, schedule, x_T, cond, uncond, jax.random.key(7),
                                 sampler="ddim", num_steps=3, guidance_scale=guidance_scale,
                                 eta=eta)

  # Strongly typed scalars, as a caller holding them in a config or state would pass them
  # (a bare Python float is weakly typed: switching between the two kinds traces once more).
  outputs = [run(jnp.float32(w), jnp.float32(eta))
             for w, eta in [(1.0, 0.0), (7.5, 0.0), (7.5, 1.0), (3.0, 0.5)]]
  assert len(traces) == 1
  # The traced values are really used: every call gave a different result.
  flat = np.stack([np.asarray(o).ravel() for o in outputs])
  assert all(np.abs(flat[i] - flat[j]).max() > 1e-4
             for i in range(len(flat)) for j in range(i))


# v-prediction runs through the same pred_x0_and_eps path (checked against diffusers above);
# each case here is a separate XLA compile, so keep to one per sampler.
@pytest.mark.parametrize("sampler,prediction_type", [
    ("ddim", "v_prediction"), ("dpm_solver", "epsilon")])
def test_oracle_denoiser_recovers_x0(sampler, prediction_type):
  schedule = _sd_schedule()  # set_alpha_to_one: DDIM's last step lands on x0 itself.
  x0 = jax.random.uniform(jax.random.key(8), SHAPE, minval=-1, maxval=1)
  abar = schedule.alphas_cumprod

  def oracle(x, t, emb):
    del emb
    a = abar[t][:, None, None, None]
    eps = (x - a**0.5 * x0) / (1 - a)**0.5  # The true noise of x given x0.
    return eps if prediction_type == "epsilon" else a**0.5 * eps - (1 - a)**0.5 * x0

  x_T = jax.random.normal(jax.random.key(9), SHAPE)
  cond, _ = _conditioning()
  result = jax.jit(functools.partial(
      diffusion.sample_loop, oracle, sampler=sampler, num_steps=10,
      prediction_type=prediction_type))(schedule, x_T, cond, None, jax.random.key(0), eta=0.0)
  np.testing.assert_allclose(result, x0, atol=1e-4)


def test_vmap_over_keys_and_jit_inside_user_jit():
  schedule = _sd_schedule()
  cond, uncond = _conditioning()
  loop = functools.partial(diffusion.sample_loop, _toy_denoiser, sampler="ddim", num_steps=3,
                           return_trajectory=True)

  def one(key, w):
    x_T = jax.random.normal(jax.random.fold_in(key, 99), SHAPE)
    return loop(schedule, x_T, cond, uncond, key, guidance_scale=w, eta=1.0)

  @jax.jit
  def user_fn(key, w):
    # A user's jitted function that calls the jitted sampler and post-processes its output.
    final, traj = jax.jit(one)(key, w)
    return jnp.tanh(final), traj.log_probs

  keys = jax.random.split(jax.random.key(11), 2)
  batched_final, batched_traj = jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, 5.0)
  assert batched_traj.log_probs.shape == (2, 3, SHAPE[0])
  for i, key in enumerate(keys):
    squashed, log_probs = user_fn(key, 5.0)
    np.testing.assert_allclose(squashed, jnp.tanh(batched_final[i]), atol=1e-5)
    np.testing.assert_allclose(log_probs, batched_traj.log_probs[i], rtol=1e-5, atol=1e-3)
  # Different keys give different samples.
  assert np.abs(batched_final[0] - batched_final[1]).max() > 1e-3
