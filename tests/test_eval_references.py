"""The reference sets of an evaluation (prompt-matched phantoms, negative controls) and C2ST."""

import subprocess
import sys

import numpy as np
import pytest

from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.eval import c2st
from fundax.eval import evaluator_train
from fundax.eval import references


def test_prompt_matched_phantoms_show_what_their_prompts_state():
  asks = [labels_lib.FundusLabels(laterality="left", field="disc", quality="usable",
                                  dr_grade=3, hypertensive_grade=0, amd_stage=2),
          labels_lib.FundusLabels(laterality="right", field="macula", quality="good",
                                  dr_grade=0, glaucoma=True, cdr=0.8)]
  prompts = [captions.caption(asks[0])] * 2 + [captions.caption(asks[1], style=1)] * 3
  images, labels = references.prompt_matched(prompts, 64)
  assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
  for got, prompt in zip(labels, prompts):
    asked = captions.parse_caption(prompt)
    for name in ("laterality", "field", "quality", "dr_grade", "amd_stage", "glaucoma"):
      if getattr(asked, name) is not None:
        assert getattr(got, name) == getattr(asked, name), (name, prompt)
  # Samples of one prompt are different eyes; the same call draws the same eyes again.
  assert not np.array_equal(images[0], images[1])
  again, _ = references.prompt_matched(prompts, 64)
  np.testing.assert_array_equal(again, images)
  other, _ = references.prompt_matched(prompts, 64, first_seed=references.SECOND_SEED)
  assert not np.array_equal(other[0], images[0])


def test_contradictory_prompts_fall_back_to_the_facts_a_phantom_can_draw():
  # DME asked for an eye without diabetic retinopathy: the phantom cannot draw it.
  prompt = "left eye, macula-centred, good quality, no diabetic retinopathy, macular oedema"
  images, labels = references.prompt_matched([prompt], 64)
  assert labels[0].laterality == "left" and labels[0].field == "macula"
  assert labels[0].dr_grade == 0


def test_negative_controls():
  images = np.stack([phantom.generate(i, 64).image for i in range(4)])
  blurred = references.blurred(images)
  assert blurred.dtype == np.uint8 and blurred.shape == images.shape
  # Blur removes fine structure: far less high-frequency energy inside the field of view.
  hf = lambda x: np.abs(np.diff(x[:, 16:48, 16:48].astype(float), axis=2)).mean()
  assert hf(blurred) < 0.5 * hf(images)
  np.testing.assert_array_equal(references.mirrored(images)[:, :, 0], images[:, :, -1])
  prompts = ["a", "a", "b", "c"]
  assert references.shifted_prompts(prompts) == ["b", "b", "c", "a"]
  collapsed = references.collapsed(images, prompts)
  np.testing.assert_array_equal(collapsed[1], images[0])
  np.testing.assert_array_equal(collapsed[3], images[3])
  floats = images.astype(np.float32) / 127.5 - 1
  copies = references.noisy_copies(floats, 6, seed=0)
  assert copies.shape == (6, 64, 64, 3)
  rms = np.sqrt(((copies[5] - floats[1]) ** 2).mean())
  assert 0 < rms < 2 * references.COPY_NOISE


def test_wilson_interval_hand_values():
  # 8 of 10: p = 0.8, z = 1.96 -> centre (0.8 + 0.192) / 1.384 = 0.7167, half 0.2167.
  low, high = c2st.wilson_interval(8, 10)
  assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
  low, high = c2st.wilson_interval(0, 20)
  assert low == pytest.approx(0.0, abs=1e-12) and 0.1 < high < 0.2
  assert np.isnan(c2st.wilson_interval(0, 0)[0])


def test_c2st_tells_blurred_from_sharp_and_not_phantoms_from_phantoms():
  a = np.stack([phantom.generate(10 + i, 64).image for i in range(24)])
  b = np.stack([phantom.generate(100 + i, 64).image for i in range(24)])
  to_float = lambda x: x.astype(np.float32) / 127.5 - 1
  config = {"steps": 100}
  blur = c2st.c2st(to_float(a), to_float(references.blurred(b)), config)
  same = c2st.c2st(to_float(a), to_float(b), config)
  assert blur["n"] == 48 and blur["accuracy"] >= 0.9 and blur["ci95"][0] > 0.7
  assert same["ci95"][0] < 0.5 < same["ci95"][1] or abs(same["accuracy"] - 0.5) < 0.2
  with pytest.raises(ValueError, match="at least 4"):
    c2st.c2st(to_float(a[:3]), to_float(b), config)


def test_mirror_half_flips_the_eye_with_the_image():
  images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3).repeat(8, axis=0)
  targets = {"laterality": np.array([0, 1] * 8), "dr_grade": np.arange(16)}
  out, out_targets = evaluator_train.mirror_half(images, targets, seed=0, step=3)
  mirrored = np.array([not np.array_equal(o, i) for o, i in zip(out, images)])
  assert 0 < mirrored.sum() < 16
  np.testing.assert_array_equal(out[mirrored], images[mirrored][:, :, ::-1])
  np.testing.assert_array_equal(out_targets["laterality"][mirrored],
                                1 - targets["laterality"][mirrored])
  np.testing.assert_array_equal(out_targets["laterality"][~mirrored],
                                targets["laterality"][~mirrored])
  np.testing.assert_array_equal(out_targets["dr_grade"], targets["dr_grade"])
  again, _ = evaluator_train.mirror_half(images, targets, seed=0, step=3)
  np.testing.assert_array_equal(again, out)  # a function of (seed, step): resumable


def test_generate_images_is_the_same_in_worker_processes():
  seeds, constraints = [5, 6, 7], [{"laterality": "left"}, {}, {"dr_grade": 4}]
  here, labels = phantom.generate_images(seeds, 64, constraints)
  there, labels_there = phantom.generate_images(seeds, 64, constraints, num_workers=2)
  np.testing.assert_array_equal(here, there)
  assert labels == labels_there and labels[0].laterality == "left" and labels[2].dr_grade == 4
  np.testing.assert_array_equal(here[1], phantom.generate(6, 64).image)


def test_workers_that_die_starting_are_an_error_not_a_hang(tmp_path):
  """A script without the `__main__` guard: each spawned worker runs the script again and dies
  (multiprocessing forbids starting processes while bootstrapping); the call raises, naming
  the guard, instead of replacing the workers forever."""
  script = tmp_path / "unguarded.py"
  script.write_text("from fundax.data import phantom\n"
                    "phantom.generate_images(range(4), 64, num_workers=2)\n")
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 1
  assert 'must call it under `if __name__ == "__main__":`' in done.stderr.splitlines()[-1]
