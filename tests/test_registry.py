"""Extension points: a sampler registered from one file runs wherever samplers are named (the
sampling loop, `generate`, the CLI), RLHF rollouts take any registered sampler with exact
log-probs, and the RLHF reward is chosen by name, a user's own included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_ldm
from fundax import cli
from fundax import configlib
from fundax import sampling
from fundax.data import labels as labels_lib
from fundax.diffusion import registry
from fundax.diffusion import samplers
from fundax.diffusion import schedules
from fundax.diffusion import steps
from fundax.models import unet as unet_lib
from fundax.rl import reward as reward_lib
from fundax.rl import rollout as rollout_lib
from fundax.rl import rounds

SHAPE = (2, 4, 4, 3)


@dataclasses.dataclass(frozen=True)
class DeterministicDDIM:
  """A toy sampler as a user's file would write one: DDIM at eta 0 whatever eta says, on
  trailing timesteps unless the scheduler config names a spacing."""
  name: str = "toy_ddim"
  default_spacing: str = "trailing"
  exact_log_probs: bool = False

  def timesteps(self, num_steps, num_train_timesteps, spacing, steps_offset):
    return steps.DDIM().timesteps(num_steps, num_train_timesteps, spacing, steps_offset)

  def init_carry(self, x_T):
    return ()

  def step(self, schedule, model_output, t, t_prev, x_t, carry, *, key, eta, prediction_type):
    del eta
    x_prev, log_prob = steps.ddim_step(schedule, model_output, t, t_prev, x_t, 0.0, key=key,
                                       prediction_type=prediction_type)
    return x_prev, log_prob, carry


@pytest.fixture
def toy(monkeypatch):
  """The toy sampler, registered for one test only."""
  monkeypatch.setattr(registry, "_SAMPLERS", dict(registry._SAMPLERS))
  return registry.register_sampler(DeterministicDDIM())


def _toy_denoiser(x, t, cond):
  return 0.5 * x + 0.01 * t.astype(jnp.float32)[:, None, None, None] + cond[:, None, None, :]


def test_registered_sampler_runs_in_the_loop_with_its_own_spacing(toy):
  schedule = schedules.make_schedule()
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  cond = jnp.linspace(-1.0, 1.0, SHAPE[0] * SHAPE[-1]).reshape(SHAPE[0], SHAPE[-1])
  assert "toy_ddim" in registry.sampler_names()
  assert "toy_ddim" not in registry.log_prob_sampler_names()
  run = lambda sampler, eta, spacing: samplers.sample_loop(
      _toy_denoiser, schedule, x_T, cond, None, jax.random.key(1), sampler=sampler,
      num_steps=4, eta=eta, timestep_spacing=spacing)
  np.testing.assert_array_equal(run("toy_ddim", 1.0, None), run("ddim", 0.0, "trailing"))
  np.testing.assert_array_equal(samplers.make_timesteps("toy_ddim", 4)[0], [999, 749, 499, 249])


def test_registered_sampler_is_accepted_by_generate_and_the_cli(toy):
  models = tiny_ldm.tiny_models()
  shapes = lambda module, *args: jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  params = {"unet": shapes(models.unet, *unet_lib.dummy_inputs(models.unet.config)),
            "vae": shapes(models.vae, jnp.zeros((1, 32, 32, 3))),
            "text": shapes(models.text, jnp.zeros((1, tiny_ldm.LENGTH), jnp.int32))}
  ids, mask = tiny_ldm.prompts()
  generate = lambda sampler: jax.eval_shape(lambda p: sampling.generate(
      p, models, ids, mask, jax.random.key(0), sampler=sampler, num_steps=2), params)
  assert generate("toy_ddim").shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match="toy_ddim"):  # the error lists the registered ones
    generate("euler")
  parser = cli.make_parser()
  base = ["sample", "--checkpoint", "run", "--prompt", "right eye", "--out", "grid.png"]
  assert parser.parse_args(base + ["--sampler", "toy_ddim"]).sampler == "toy_ddim"
  with pytest.raises(ValueError, match="toy_ddim"):  # the CLI's one-line usage error
    parser.parse_args(base + ["--sampler", "euler"])


def test_register_refuses_a_taken_name_and_an_incomplete_sampler(monkeypatch):
  monkeypatch.setattr(registry, "_SAMPLERS", dict(registry._SAMPLERS))
  with pytest.raises(ValueError, match="already registered"):
    registry.register_sampler(steps.DDIM())
  with pytest.raises(ValueError, match="moments"):  # exact log-probs need `moments`
    registry.register_sampler(DeterministicDDIM(name="claims", exact_log_probs=True))


def test_rollout_with_ddpm_scores_its_own_steps():
  """Any sampler with log-probs drives RLHF: DDPM's rollout log-probs are what the update's
  `step_moments` rescores them as (the first importance ratio is 1), its last step excluded."""
  models = tiny_ldm.tiny_models()
  params = tiny_ldm.init_params(models)
  ids, mask = tiny_ldm.prompts()
  frozen = {"vae": params["vae"], "text": params["text"]}
  num_steps = 3

  @jax.jit
  def rollout_and_rescore(unet_params, key):
    ro = rollout_lib.rollout(unet_params, frozen, ids, mask, key, 3.0, 1.0, models=models,
                             sampler="ddpm", num_steps=num_steps)

    def rescore(i):
      t = jnp.full((ids.shape[0],), ro.timesteps[i])
      t_prev = jnp.full((ids.shape[0],), ro.prev_timesteps[i])
      mean, std = rollout_lib.step_moments(models, unet_params, ro.latents[i], t, t_prev,
                                           ro.cond, ro.uncond, 3.0, 1.0, sampler="ddpm")
      return steps.gaussian_log_prob(ro.latents[i + 1], mean, std)
    return ro.log_probs, jax.lax.map(rescore, jnp.arange(num_steps))

  log_probs, rescored = rollout_and_rescore(params["unet"], jax.random.key(2))
  np.testing.assert_allclose(rescored, log_probs, rtol=1e-4)
  stochastic = rollout_lib.stochastic_steps(models, "ddpm", num_steps)
  np.testing.assert_array_equal(stochastic, [0, 1])
  assert np.all(np.asarray(log_probs)[stochastic] != 0) and np.all(np.asarray(log_probs)[-1] == 0)
  with pytest.raises(ValueError, match="exact log-probs"):
    rollout_lib.stochastic_steps(models, "dpm_solver", num_steps)


def _rlhf_config(**overrides):
  config = configlib.load_config("configs/rlhf.py:test")
  items = {"ldm_checkpoint": "ldm", "evaluator_checkpoint": "evaluator", **overrides}
  return configlib.apply_overrides(config, [f"{k}={v}" for k, v in items.items()])


def test_rlhf_config_names_its_sampler():
  rounds.check_config(_rlhf_config(selector_checkpoint="s", **{"rollout.sampler": "ddpm"}))
  with pytest.raises(ValueError, match="rollout.sampler must be a sampler with exact log-probs"):
    rounds.check_config(_rlhf_config(selector_checkpoint="s",
                                     **{"rollout.sampler": "dpm_solver"}))


def test_registered_reward_is_picked_by_name(monkeypatch):
  monkeypatch.setattr(reward_lib, "_REWARDS", dict(reward_lib._REWARDS))

  @reward_lib.register_reward("darkness")
  def make_darkness(config):
    scale = config.rollout.guidance_scale  # a factory reads what it needs from the config
    return lambda images, prompts: -scale * np.asarray(images).mean(axis=(1, 2, 3))

  config = _rlhf_config(reward="darkness")
  rounds.check_config(config)  # no selector_checkpoint needed for another reward
  images = np.stack([np.full((4, 4, 3), v, np.float32) for v in (-0.5, 0.5)])
  np.testing.assert_allclose(reward_lib.make_reward(config)(images, ["a", "b"]),
                             [1.5, -1.5])
  assert reward_lib.make_reward(_rlhf_config(reward="mean_brightness")) is (
      reward_lib.mean_brightness)
  with pytest.raises(ValueError, match="already registered"):
    reward_lib.register_reward("darkness")(make_darkness)
  with pytest.raises(ValueError, match="reward must be one of .*darkness"):
    rounds.check_config(_rlhf_config(reward="nope", selector_checkpoint="s"))
  with pytest.raises(ValueError, match="retrain_selector"):
    rounds.check_config(_rlhf_config(reward="darkness",
                                     **{"feedback.retrain_selector": True}))


def test_evaluator_reward_is_the_confirmed_fraction_of_stated_attributes():
  right = labels_lib.LATERALITIES.index("right")
  predictions = {"dr_grade": np.array([0, 3, 0]), "laterality": np.array([right, right, 0])}
  stub = type("Stub", (), {"readable": None, "predict": lambda self, images: predictions})()
  prompt = "Colour fundus photograph of the right eye, no diabetic retinopathy"
  scores = reward_lib.EvaluatorReward(stub)(np.zeros((3, 8, 8, 3)), [prompt, prompt, ""])
  np.testing.assert_allclose(scores, [1.0, 0.5, 0.0])
