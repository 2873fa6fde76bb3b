"""Hand-worked numbers for the RLHF maths: advantages, PPO clipping, KL, RWR weights, the guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundax.rl import advantages
from fundax.rl import ddpo
from fundax.rl import guard
from fundax.rl import prompts as prompts_lib
from fundax.rl import rwr


def test_advantages_batch_stats_until_min_count_then_per_prompt():
  # Batch 1: prompts a, a, b with rewards 1, 3, 5; min_count 3 is not reached by either, so
  # the batch statistics apply: mean 3, std sqrt(8/3) = 1.63299.
  adv, buffers, info = advantages.compute_advantages(
      {}, ["a", "a", "b"], [1.0, 3.0, 5.0], buffer_size=4, min_count=3, clip=10.0)
  np.testing.assert_allclose(adv, [-2 / 1.632993, 0.0, 2 / 1.632993], rtol=1e-5)
  assert buffers == {"a": [1.0, 3.0], "b": [5.0]} and info["per_prompt_fraction"] == 0.0
  # Batch 2: a gets 5 -> buffer [1, 3, 5] (3 >= min_count): mean 3, std 1.63299, so
  # (5 - 3) / 1.63299 = 1.2247; b gets 5 -> buffer [5, 5]: batch stats of [5, 5] (std 0),
  # so (5 - 5) / eps = 0.
  adv, buffers, info = advantages.compute_advantages(
      buffers, ["a", "b"], [5.0, 5.0], buffer_size=4, min_count=3, clip=10.0)
  np.testing.assert_allclose(adv, [1.2247449, 0.0], rtol=1e-5)
  assert info["per_prompt_fraction"] == 0.5
  # The buffer keeps only the last buffer_size rewards.
  _, buffers, _ = advantages.compute_advantages(
      buffers, ["a", "a"], [7.0, 9.0], buffer_size=4, min_count=3, clip=10.0)
  assert buffers["a"] == [3.0, 5.0, 7.0, 9.0]


def test_advantages_group_fallback_compares_a_prompts_own_candidates():
  # a, a, b, b with rewards 1, 3, 4, 8, no prompt at min_count. "batch": mean 4, std
  # sqrt(26 / 4) = 2.54951. "group": means a 2, b 6; residuals -1, 1, -2, 2, pooled std
  # sqrt(10 / 4) = 1.58114; c (one candidate) has nothing to be compared with: 0.
  prompts, rewards = ["a", "a", "b", "b"], [1.0, 3.0, 4.0, 8.0]
  kw = dict(buffer_size=8, min_count=3, clip=10.0)
  adv, _, _ = advantages.compute_advantages({}, prompts, rewards, **kw)
  np.testing.assert_allclose(adv, np.array([-3, -1, 0, 4]) / 2.54951, rtol=1e-5)
  adv, _, _ = advantages.compute_advantages({}, prompts, rewards, fallback="group", **kw)
  np.testing.assert_allclose(adv, np.array([-1, 1, -2, 2]) / 1.58114, rtol=1e-5)
  adv, _, info = advantages.compute_advantages({}, [*prompts, "c"], [*rewards, 9.0],
                                               fallback="group", **kw)
  assert adv[4] == 0.0 and info["per_prompt_fraction"] == 0.0
  # A prompt at min_count still uses its own buffer, whatever the fallback.
  adv, _, info = advantages.compute_advantages({"a": [0.0, 4.0]}, prompts, rewards,
                                               fallback="group", **kw)
  np.testing.assert_allclose(adv[:2], (np.array([1.0, 3.0]) - 2.0) / np.std([0, 4, 1, 3]),
                             rtol=1e-5)
  assert info["per_prompt_fraction"] == 0.5
  with pytest.raises(ValueError, match="fallback"):
    advantages.compute_advantages({}, prompts, rewards, fallback="median", **kw)


def test_advantages_clip_and_do_not_mutate():
  buffers = {"a": [0.0] * 7 + [1.0]}
  adv, new, _ = advantages.compute_advantages(buffers, ["a"], [1.0], buffer_size=100,
                                              min_count=2, clip=1.5)
  # Buffer [0 x7, 1, 1]: mean 2/9, std 0.41574; (1 - 0.2222) / 0.41574 = 1.87 -> clipped.
  assert adv[0] == pytest.approx(1.5)
  assert buffers == {"a": [0.0] * 7 + [1.0]} and len(new["a"]) == 9
  with pytest.raises(ValueError, match="rewards"):
    advantages.compute_advantages({}, ["a", "b"], [1.0], buffer_size=2, min_count=1, clip=1)


@pytest.mark.parametrize("ratio,adv,loss,grad", [
    (1.0, 2.0, -2.0, -2.0),      # on-policy: plain policy gradient
    (1.5, 2.0, -2.4, 0.0),       # A > 0, ratio above 1 + eps: clipped, no gradient
    (0.5, 2.0, -1.0, -2.0),      # A > 0, ratio below 1 - eps: unclipped (the pessimistic term)
    (0.5, -2.0, 1.6, 0.0),       # A < 0, ratio below 1 - eps: clipped, no gradient
    (1.5, -2.0, 3.0, 2.0),       # A < 0, ratio above 1 + eps: unclipped, full gradient
    (1.1, 2.0, -2.2, -2.0),      # inside the clip range: plain policy gradient
    (3.0, 0.0, 0.0, 0.0),        # zero advantage: no loss, no gradient
])
def test_ppo_clipping_edge_cases(ratio, adv, loss, grad):
  eps = 0.2
  fn = lambda r: ddpo.ppo_loss(r, jnp.float32(adv), eps)
  value, g = jax.value_and_grad(fn)(jnp.float32(ratio))
  assert float(value) == pytest.approx(loss, abs=1e-6)
  assert float(g) == pytest.approx(grad, abs=1e-6)


def test_gaussian_kl_and_step_count():
  mean_p = jnp.ones((2, 2, 2, 1))
  mean_q = jnp.zeros((2, 2, 2, 1))
  std = jnp.array([0.5, 0.0]).reshape(2, 1, 1, 1)
  # 4 elements of (1 - 0)^2 / (2 * 0.25) = 2 each -> 8; a deterministic step has no KL.
  np.testing.assert_allclose(np.asarray(ddpo.gaussian_kl(mean_p, mean_q, std)), [8.0, 0.0])
  assert ddpo.num_train_steps(5, 0.5) == 3 and ddpo.num_train_steps(5, 0.01) == 1
  assert ddpo.num_train_steps(4, 0.5) == 2
  chosen = np.asarray(ddpo.choose_steps(jax.random.key(0), jnp.arange(5), 3, 5))
  assert all(sorted(row) == [0, 1, 2, 3, 4] for row in chosen)  # permutations per trajectory


def test_reward_weights():
  w = rwr.reward_weights([0.9, 0.2, 0.8, 0.95], [True, False, True, True], temperature=0.1)
  # exp((r - 0.95) / 0.1) over the accepted: e^-0.5, e^-1.5, 1 -> scaled to average 1.
  raw = np.exp([-0.5, -1.5, 0.0])
  np.testing.assert_allclose(w, [raw[0] * 3 / raw.sum(), 0.0, raw[1] * 3 / raw.sum(),
                                 3 / raw.sum()], rtol=1e-6)
  assert w[[0, 2, 3]].mean() == pytest.approx(1.0)
  assert not rwr.reward_weights([0.1, 0.2], [False, False], 1.0).any()
  with pytest.raises(ValueError, match="temperature"):
    rwr.reward_weights([0.1], [True], 0.0)


def test_composite_and_guard_rule():
  base = {"quality": 0.6, "consistency": 0.5, "domain_fd": 10.0, "diversity": 0.3,
          "privacy": 0.0}
  # 0.6 + 0.5 - 10/10 + (1 - 0.3) + (1 - 0) = 1.8
  assert guard.composite(base, base) == pytest.approx(1.8)
  worse = {**base, "domain_fd": 20.0}
  assert guard.composite(worse, base) == pytest.approx(0.8)
  history = [{"round": 0, "reward": 0.5, "composite": 1.8},
             {"round": 1, "reward": 0.6, "composite": 1.9}]
  assert guard.check(history, 0.1) == (False, "")  # both rise: learning, not hacking
  history.append({"round": 2, "reward": 0.7, "composite": 1.75})
  assert not guard.check(history, 0.2)[0]  # fell 0.15 below the best: within tolerance
  stop, reason = guard.check(history, 0.1)
  assert stop and "round 2" in reason and "round 1" in reason
  # Both falling is a bad round, not reward hacking.
  history[-1] = {"round": 2, "reward": 0.55, "composite": 1.0}
  assert not guard.check(history, 0.1)[0]
  # A retrained Selector: the best round's images rescored today decide "rose".
  history[-1] = {"round": 2, "reward": 0.55, "composite": 1.0, "best_reward_now": 0.4}
  assert guard.check(history, 0.1)[0]
  assert guard.best_index(history) == 1


def test_prompt_sets_are_reproducible_and_disjoint(tmp_path):
  a = prompts_lib.make_prompt_set(0, 3)
  b = prompts_lib.make_prompt_set(0, 3)
  assert a.heldout == b.heldout and len(set(a.heldout)) == 3
  assert a.draw(4, 1, 0, 2) == b.draw(4, 1, 0, 2) != a.draw(4, 1, 0, 3)
  assert not set(a.draw(8, 0, 0, 0)) & set(a.heldout)
  path = tmp_path / "prompts.txt"
  path.write_text("left eye, mild NPDR\n\n  right eye, no DR  \n")
  c = prompts_lib.make_prompt_set(0, 2, str(path))
  assert set(c.draw(6, 0)) <= {"left eye, mild NPDR", "right eye, no DR"}
  path.write_text(c.heldout[0] + "\n")
  d = prompts_lib.make_prompt_set(0, 2, str(path))
  with pytest.raises(ValueError, match="disjoint"):
    d.draw(1, 0)
  with pytest.raises(FileNotFoundError, match="nothere"):
    prompts_lib.make_prompt_set(0, 1, str(tmp_path / "nothere.txt"))


def test_ablation_arms_share_the_query_budget():
  from fundax import configlib  # pylint: disable=g-import-not-at-top
  from fundax.rl import ablation  # pylint: disable=g-import-not-at-top
  config = configlib.load_config("configs/rlhf.py:tiny")
  configlib.apply_overrides(config, ["stage1.iterations=2", "stage2.iterations=3"])
  arms = {arm: ablation.arm_config(config, arm) for arm in ablation.ARMS}
  assert (arms["rwr_only"].stage1.iterations, arms["rwr_only"].stage2.iterations) == (0, 5)
  assert (arms["ddpo_only"].stage1.iterations, arms["ddpo_only"].stage2.iterations) == (5, 0)
  assert (arms["both"].stage1.iterations, arms["both"].stage2.iterations) == (2, 3)
  assert not any(c.feedback.enabled or c.feedback.retrain_selector for c in arms.values())
  assert config.feedback.enabled  # the caller's config is left as it was
  with pytest.raises(ValueError, match="unknown ablation arm"):
    ablation.arm_config(config, "dpo")
