"""Tests for the VAE step's loss pieces, the PatchGAN discriminator and the metric writer."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np

from tensorboardX import crc32c as crc32c_lib
from tensorboardX.proto import event_pb2

from fundax.models import discriminator as disc_lib
from fundax.train import metric_writers
from fundax.train import vae_step


def test_ssim_identity_and_degradation():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  np.testing.assert_allclose(vae_step.ssim(x, x), [1.0, 1.0], atol=1e-5)
  noisy = x + 0.5 * jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  s = np.asarray(vae_step.ssim(x, noisy))
  assert np.all(s < 0.9) and np.all(s > -1)
  # A constant image against itself shifted: only the luminance term differs.
  a, b = jnp.zeros((1, 11, 11, 1)), jnp.full((1, 11, 11, 1), 0.2)  # [0, 1] means 0.5, 0.6
  c1 = 0.01 ** 2
  expected = (2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1)
  # float32 cancellation in E[x^2] - E[x]^2 leaves ~1e-7 variances against c2 = 9e-4.
  np.testing.assert_allclose(vae_step.ssim(a, b), [expected], rtol=1e-3)


def test_reconstruction_and_hinge_by_hand():
  x = jnp.zeros((2, 2, 2, 1))
  y = jnp.stack([jnp.full((2, 2, 1), 0.5), jnp.full((2, 2, 1), -2.0)])
  np.testing.assert_allclose(vae_step.reconstruction_error(x, y, "l1"), [0.5, 2.0])
  np.testing.assert_allclose(vae_step.reconstruction_error(x, y, "l2"), [0.25, 4.0])
  real = jnp.array([[2.0, 0.5]])  # relu(1 - D): 0, 0.5 -> 0.25
  fake = jnp.array([[-3.0, 0.0]])  # relu(1 + D): 0, 1 -> 0.5
  np.testing.assert_allclose(vae_step.hinge_discriminator_loss(real, fake), [0.75])


def test_patch_discriminator_shape():
  disc = disc_lib.PatchDiscriminator(base_channels=8, num_layers=2, norm_groups=4)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.jit(disc.init)(jax.random.key(0), x)
  logits = disc.apply(params, x)
  # 32 -> 16 (conv_in) -> 8 (conv_1) -> 7 (conv_2, stride 1) -> 6 (conv_out).
  assert logits.shape == (2, 6, 6, 1) and logits.dtype == jnp.float32


def read_events(directory):
  """The Event protos of every event file in `directory`, parsed with tensorboardX's protos.

  TFRecord framing: u64 length, u32 masked CRC of the length, the proto, u32 masked CRC of
  the proto (both CRCs checked with tensorboardX's own CRC-32C).
  """
  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      header = data[i:i + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header)
      payload = data[i + 12:i + 12 + length]
      assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == (
          masked_crc32c(payload))
      events.append(event_pb2.Event.FromString(payload))
      i += 16 + length
  return events


def masked_crc32c(data):
  crc = crc32c_lib.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_metric_writer_jsonl_events_and_resume(tmp_path):
  with metric_writers.MetricWriter(tmp_path) as writer:
    writer.write(1, {"loss": jnp.float32(0.5), "name": "skipped"})
    writer.write(2, {"loss": 0.25, "nonfinite": 1.0})
    writer.write(2, {"loss": 1.0}, split="eval")
    # Written through before close: a killed run leaves its records readable.
    assert len(read_events(tmp_path / "tensorboard")) == 5
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"], r["loss"]) for r in records] == [
      (1, "train", 0.5), (2, "train", 0.25), (2, "eval", 1.0)]
  assert "name" not in records[0]
  events = read_events(tmp_path / "tensorboard")
  assert events[0].file_version == "brain.Event:2"
  assert events[1].session_log.status == event_pb2.SessionLog.START and events[1].step == 1
  scalars = [(e.step, v.tag, v.simple_value) for e in events[2:] for v in e.summary.value]
  assert scalars == [(1, "train/loss", 0.5), (2, "train/loss", 0.25), (2, "train/nonfinite", 1.0),
                     (2, "eval/loss", 1.0)]
  # Resuming from step 1 drops the records of steps that will be recomputed, and a new event
  # file tells TensorBoard to hide the old file's records from step 2 on.
  metric_writers.MetricWriter(tmp_path, resume_step=1).close()
  kept = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert kept == [1]
  files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 2
  purge = [e for e in read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
  assert sorted(e.step for e in purge) == [1, 2]
