"""Phantom rendering speed on one CPU core: images per second at 128 and 512 px.

    python bench/phantom_speed.py  # writes bench/results/phantom_speed.json

Each figure is the median over repeats (after a warm-up) of images/s for `generate(seed, res)`
over a fixed run of seeds with the default case mix: case sampling plus rendering, everything a
dataset builder pays per image. Threads are pinned to one before numpy loads. The headline rate
uses this process's CPU time, which on a shared machine stays close to what one free core gives;
the wall-clock rate is recorded next to it (with the load average) for comparison.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"

import json  # noqa: E402  (after pinning threads)
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from fundax.data import phantom  # noqa: E402

RUNS = {128: 40, 512: 8}  # images per timed repeat
REPEATS = 5
TARGET_128 = 50.0  # images/s the phantom must reach at 128 px on one core


def images_per_second(resolution: int, count: int, first_seed: int) -> tuple[float, float]:
  """(images per CPU second, images per wall-clock second) for `count` consecutive seeds."""
  cpu, wall = time.process_time(), time.perf_counter()
  for seed in range(first_seed, first_seed + count):
    phantom.generate(seed, resolution)
  return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def main():
  results = {}
  for resolution, count in RUNS.items():
    images_per_second(resolution, 5, 10_000)  # warm-up: caches, imports
    rates = [images_per_second(resolution, count, r * count) for r in range(REPEATS)]
    cpu = statistics.median(r[0] for r in rates)
    wall = statistics.median(r[1] for r in rates)
    results[str(resolution)] = {"images_per_cpu_s_median": round(cpu, 2),
                                "images_per_wall_s_median": round(wall, 2),
                                "images_per_cpu_s_all": [round(r[0], 2) for r in rates],
                                "images_per_repeat": count}
    print(f"{resolution:4d} px: {cpu:7.1f} images/s of CPU time, {wall:7.1f} wall-clock "
          f"(median of {REPEATS})")
  out = {"benchmark": "phantom.generate, default case mix, one thread",
         "target_images_per_s_at_128": TARGET_128,
         "meets_target": results["128"]["images_per_cpu_s_median"] >= TARGET_128,
         "machine": platform.processor() or platform.machine(),
         "load_average_1min": round(os.getloadavg()[0], 2), "results": results}
  path = pathlib.Path(__file__).parent / "results" / "phantom_speed.json"
  path.parent.mkdir(exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
