"""The retinal vessel tree of the phantom: growth, artery-vein crossings and drawing.

Two trees (arteries, veins) grow from the optic disc in normalised image coordinates, so the
same seed gives the same tree at every resolution. Each tree has superior and inferior temporal
arcades that curve around the macula, superior and inferior nasal vessels and a few small
papillomacular vessels; every vessel branches a few generations deep with tapering widths.
Growth is batched per generation (all vessels of a generation grow in one array operation), so a
tree of a few hundred vessels takes a few milliseconds.

A tree is a flat polyline set: points [P, 2], radii [P], vessel ids [P] (points of one vessel are
consecutive), plus a generation per vessel.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fundax.data.phantom import raster

STEP = 0.012  # growth step along a vessel, normalised units (3 px at 512 px)
MAX_GENERATION = 3  # main vessels are generation 0
# Mean branch spacing along a vessel per generation, in disc diameters.
_BRANCH_SPACING_DD = (2.2, 3.4, 4.5)
FAZ_DD = 0.22  # radius of the foveal avascular zone, disc diameters
MIN_RADIUS = 0.0025  # vessels thinner than this (normalised) are not grown


@dataclasses.dataclass(frozen=True)
class Tree:
  """One vessel tree (arteries or veins) as flat polylines."""

  points: np.ndarray  # [P, 2] float, normalised (x, y)
  radii: np.ndarray  # [P] float, normalised
  vessel: np.ndarray  # [P] int, vessel id of each point; a vessel's points are consecutive
  generation: np.ndarray  # [V] int, branching generation of each vessel (0 = leaves the disc)

  @property
  def num_vessels(self) -> int:
    return len(self.generation)

  def segments(self, max_generation: int = MAX_GENERATION, stride: int = 1):
    """Consecutive point pairs of the same vessel: (p0, p1, r0, r1, vessel id), each [S, ...].

    Args:
      max_generation: only vessels up to this generation.
      stride: keep every `stride`-th point (and each vessel's last), for coarse resolutions.

    Returns:
      Tuple of arrays p0 [S, 2], p1 [S, 2], r0 [S], r1 [S], vessel [S].
    """
    keep = self.generation[self.vessel] <= max_generation
    if stride > 1:
      last = np.r_[self.vessel[1:] != self.vessel[:-1], True]
      keep &= (_index_in_vessel(self.vessel) % stride == 0) | last
    pts, rad, vid = self.points[keep], self.radii[keep], self.vessel[keep]
    same = vid[1:] == vid[:-1]
    return pts[:-1][same], pts[1:][same], rad[:-1][same], rad[1:][same], vid[:-1][same]


def _index_in_vessel(vessel: np.ndarray) -> np.ndarray:
  """Position of each point along its own vessel (0 at the vessel's first point)."""
  i = np.arange(len(vessel))
  first = np.r_[True, vessel[1:] != vessel[:-1]]
  return i - np.maximum.accumulate(np.where(first, i, 0))


def _grow_batch(rng, start, h0, target, lam, length, r0, r1, wiggle, fovea, faz, fov_radius,
                avoid):
  """Grows n vessels at once; returns (points [n, T, 2], radii [n, T], count [n])."""
  n = len(start)
  steps = max(int(np.ceil(length.max() / STEP)), 1)
  s = np.arange(1, steps + 1) * STEP  # arc length after each step
  drift = np.cumsum(rng.normal(0.0, 1.0, (n, steps)) * wiggle[:, None] * np.sqrt(STEP), axis=1)
  # tortuosity: a gentle meander (random wavelength and phase) on top of the random drift
  wavelength = rng.uniform(0.08, 0.2, (n, 1))
  meander = rng.uniform(0.1, 0.3, (n, 1)) * np.sin(2 * np.pi * s[None] / wavelength +
                                                    rng.uniform(0, 2 * np.pi, (n, 1)))
  heading = (target[:, None] + (h0 - target)[:, None] * np.exp(-s[None] / lam[:, None]) + drift +
             meander)
  step = STEP * np.stack([np.cos(heading), np.sin(heading)], -1)
  pts = np.concatenate([start[:, None], start[:, None] + np.cumsum(step, axis=1)], axis=1)
  s = np.r_[0.0, s]
  ok = (s[None] <= length[:, None]) & (np.hypot(pts[..., 0], pts[..., 1]) < fov_radius + 0.03)
  # thick vessels keep away from the fovea, only capillary-sized ones reach the avascular zone
  radii_now = r0[:, None] + (r1 - r0)[:, None] * np.clip(s[None] / length[:, None], 0.0, 1.0)
  ok &= np.hypot(pts[..., 0] - fovea[0], pts[..., 1] - fovea[1]) > faz + avoid * radii_now
  ok[:, 0] = True
  count = np.argmin(np.c_[ok, np.zeros(n, bool)], axis=1)  # first failing step ends a vessel
  return pts, radii_now, count


def grow_tree(rng: np.random.Generator, disc: np.ndarray, fovea: np.ndarray, disc_diameter: float,
              nasal_sign: float, fov_radius: float, radius_scale: float) -> Tree:
  """Grows one vessel tree from the disc.

  Args:
    rng: randomness for this tree only.
    disc: disc centre (x, y), normalised.
    fovea: fovea centre (x, y), normalised.
    disc_diameter: disc diameter, normalised units.
    nasal_sign: +1 when the nasal side is +x (right eye), -1 otherwise.
    fov_radius: radius of the field of view (centred on the image).
    radius_scale: radius of the main vessels at the disc, normalised (veins ~0.013).

  Returns:
    The tree.
  """
  dd = disc_diameter
  t = -nasal_sign  # +1 when temporal (towards the fovea) is +x
  # Main vessels in a frame where temporal is +x: (start heading, target heading, bend length
  # in DD, radius factor, length in DD, wiggle).
  up, down = -np.pi / 2, np.pi / 2
  mains = [
      (up + 0.05, rng.uniform(-0.05, 0.25), 2.6, 1.0, 14.0, 0.25),  # superotemporal arcade
      (down - 0.05, rng.uniform(-0.25, 0.05), 2.6, 1.0, 14.0, 0.25),  # inferotemporal arcade
      (up - 0.15, up - rng.uniform(0.9, 1.3), 2.5, 0.75, 9.0, 0.35),  # superonasal
      (down + 0.15, down + rng.uniform(0.9, 1.3), 2.5, 0.75, 9.0, 0.35),  # inferonasal
      (np.pi + rng.uniform(-0.3, 0.3), np.pi, 3.0, 0.45, 6.0, 0.4),  # nasal
      (rng.uniform(-0.5, -0.2), 0.0, 2.0, 0.35, 2.5, 0.4),  # superior papillomacular
      (rng.uniform(0.2, 0.5), 0.0, 2.0, 0.35, 2.5, 0.4),  # inferior papillomacular
  ]
  m = np.array(mains)
  n = len(m)
  h0 = m[:, 0] + rng.normal(0, 0.08, n)
  target = m[:, 1]
  if t < 0:  # mirror headings for a temporal side at -x
    h0, target = np.pi - h0, np.pi - target
  # the central vessels leave the cup as a superior and an inferior trunk: the arcade and nasal
  # vessels start almost vertically from just above / below the disc centre and then part
  trunk = np.array([-0.05, 0.05, -0.05, 0.05, 0.0, 0.0, 0.0]) * dd
  start = disc + np.c_[np.zeros(n), trunk] + rng.normal(0, 0.02 * dd, (n, 2))
  lam = m[:, 2] * dd * rng.uniform(0.85, 1.15, n)
  length = m[:, 4] * dd * rng.uniform(0.8, 1.2, n)
  r0 = radius_scale * m[:, 3] * rng.uniform(0.9, 1.1, n)
  batch = dict(start=start, h0=h0, target=target, lam=lam, length=length, r0=r0,
               r1=r0 * 0.5, wiggle=m[:, 5])
  points, radii, vessel, generation = [], [], [], []
  faz = FAZ_DD * dd
  for gen in range(MAX_GENERATION + 1):
    pts, rad, count = _grow_batch(rng, fovea=fovea, faz=faz, fov_radius=fov_radius,
                                  avoid=0.0 if gen == 0 else 35.0, **batch)
    first_id = len(generation)
    for i, c in enumerate(count):
      points.append(pts[i, :c])
      radii.append(rad[i, :c])
      vessel.append(np.full(c, first_id + i))
      generation.append(gen)
    if gen == MAX_GENERATION:
      break
    batch = _branches(rng, pts, rad, count, _BRANCH_SPACING_DD[gen] * dd, dd, batch["length"])
    if batch is None:
      break
  return Tree(points=np.concatenate(points), radii=np.concatenate(radii),
              vessel=np.concatenate(vessel), generation=np.asarray(generation))


def _branches(rng, pts, rad, count, spacing, dd, parent_length):
  """Samples the children of a generation; returns the next `_grow_batch` arguments or None."""
  usable = np.maximum(count - int(0.3 * dd / STEP), 0)
  k = rng.poisson(usable * STEP / spacing)
  parent = np.repeat(np.arange(len(count)), k)
  if not len(parent):
    return None
  at = (count[parent] - usable[parent] + rng.random(len(parent)) * usable[parent]).astype(int)
  at = np.minimum(at, count[parent] - 2)
  d = pts[parent, at + 1] - pts[parent, at]
  heading = np.arctan2(d[:, 1], d[:, 0])
  side = rng.choice([-1.0, 1.0], len(parent))
  h0 = heading + side * rng.uniform(0.5, 1.2, len(parent))
  r0 = rad[parent, at] * rng.uniform(0.4, 0.65, len(parent))
  keep = r0 > MIN_RADIUS
  if not keep.any():
    return None
  n = int(keep.sum())
  h0 = h0[keep]
  return dict(start=pts[parent, at][keep], h0=h0,
              target=h0 + rng.normal(0, 0.3, n),
              lam=np.full(n, 1.0 * dd),
              length=np.minimum(parent_length[parent][keep] * rng.uniform(0.35, 0.8, n),
                                rng.uniform(2.0, 7.0, n) * dd),
              r0=r0[keep], r1=r0[keep] * 0.5, wiggle=np.full(n, 1.1))


def crossings(arteries: Tree, veins: Tree, max_generation: int = 1) -> np.ndarray:
  """Points where an artery crosses a vein (both up to `max_generation`).

  Args:
    arteries, veins: the two trees.
    max_generation: only crossings of vessels up to this generation (the visible ones).

  Returns:
    [k, 4] array of (x, y, artery radius, vein radius) at each crossing.
  """
  a0, a1, ar, _, _ = arteries.segments(max_generation)
  v0, v1, vr, _, _ = veins.segments(max_generation)
  if not len(a0) or not len(v0):
    return np.zeros((0, 4))
  da, dv = a1 - a0, v1 - v0
  ia, iv = _near_pairs(a0, v0, 2 * STEP)
  r = v0[iv] - a0[ia]
  den = da[ia, 0] * dv[iv, 1] - da[ia, 1] * dv[iv, 0]
  den = np.where(np.abs(den) < 1e-12, 1e-12, den)
  ta = (r[:, 0] * dv[iv, 1] - r[:, 1] * dv[iv, 0]) / den
  tv = (r[:, 0] * da[ia, 1] - r[:, 1] * da[ia, 0]) / den
  hit = (ta >= 0) & (ta < 1) & (tv >= 0) & (tv < 1)
  p = a0[ia[hit]] + ta[hit, None] * da[ia[hit]]
  return np.c_[p, ar[ia[hit]], vr[iv[hit]]]


def _near_pairs(a: np.ndarray, b: np.ndarray, cell: float):
  """Index pairs (i, j) with a[i] and b[j] in the same or neighbouring grid cells (spatial hash)."""
  ka = np.floor(a / cell).astype(np.int64)
  kb = np.floor(b / cell).astype(np.int64)
  width = 4 * int(np.ceil(2.0 / cell)) + 8
  key_b = (kb[:, 0] + width // 2) * width + kb[:, 1] + width // 2
  order = np.argsort(key_b)
  sorted_b = key_b[order]
  ia, ib = [], []
  for ox in (-1, 0, 1):
    for oy in (-1, 0, 1):
      key = (ka[:, 0] + ox + width // 2) * width + ka[:, 1] + oy + width // 2
      lo, hi = np.searchsorted(sorted_b, key), np.searchsorted(sorted_b, key, side="right")
      n = hi - lo
      i = np.repeat(np.arange(len(a)), n)
      j = order[np.repeat(lo, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)]
      ia.append(i)
      ib.append(j)
  return np.concatenate(ia), np.concatenate(ib)


def nick_veins(veins: Tree, sites: np.ndarray, reach: float, depth: float) -> Tree:
  """Narrows veins around the given crossing sites (arteriovenous nicking).

  Args:
    veins: the vein tree.
    sites: [k, 2] crossing positions.
    reach: half-length of the narrowed stretch either side of the crossing, normalised.
    depth: fraction of the vein radius removed at the crossing.

  Returns:
    The vein tree with tapered radii near the sites.
  """
  if not len(sites):
    return veins
  d = np.hypot(*(veins.points[:, None] - sites[None]).transpose(2, 0, 1)).min(1)
  factor = 1.0 - depth * np.clip(1.0 - d / reach, 0.0, 1.0)
  return dataclasses.replace(veins, radii=veins.radii * factor)


def bead_veins(veins: Tree, vessel_ids: np.ndarray, period: float, amount: float) -> Tree:
  """Venous beading: sausage-like calibre changes along the given veins.

  Args:
    veins: the vein tree.
    vessel_ids: ids of the beaded veins.
    period: distance between beads, normalised.
    amount: peak relative widening.

  Returns:
    The vein tree with modulated radii on those vessels.
  """
  on = np.isin(veins.vessel, vessel_ids)
  s = _index_in_vessel(veins.vessel) * STEP
  bead = 1.0 + amount * np.abs(np.sin(np.pi * s / period))**3
  return dataclasses.replace(veins, radii=np.where(on, veins.radii * bead, veins.radii))


def draw(tree: Tree, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Rasterises a tree: (opacity float32 [H, W], mask bool [H, W]); see raster.draw_segments."""
  # coarse images need no more than about two points per pixel along a vessel
  stride = max(1, int(2.0 / (STEP * raster.px_per_unit(resolution))))
  p0, p1, r0, r1, _ = tree.segments(stride=stride)
  return raster.draw_segments(p0, p1, r0, r1, resolution)
