"""Sampling of pathology for the phantom: where each lesion goes and how big it is.

Lesions are sampled in normalised image coordinates from the eye's `Geometry`, with counts that
rise with the clinical grade (ICDR for diabetic retinopathy, simplified AREDS for AMD,
Keith-Wagener-Barker for hypertensive retinopathy). Only lesions whose centre lies inside the
field of view are kept, so counts always equal what is drawn.

Blob lesions are arrays [n, 6] of (x, y, semi-axis along angle, semi-axis across, angle,
strength). Vascular lesions (neovascularisation, IRMA) are arrays [m, 7] of capsule segments
(x0, y0, x1, y1, r0, r1, cluster id); their count is the number of clusters.
"""

from __future__ import annotations

import numpy as np

from fundax.data.phantom import anatomy
from fundax.data.phantom import vessels

BLOB_COLUMNS = ("x", "y", "rx", "ry", "angle", "strength")
SEGMENT_COLUMNS = ("x0", "y0", "x1", "y1", "r0", "r1", "cluster")


def _scatter(rng, geometry: anatomy.Geometry, n: int, centre, r_in: float, r_out: float,
             avoid_disc: bool = True) -> np.ndarray:
  """Up to n points uniform in an annulus (radii in DD) around `centre`, inside the field of view.

  Returns:
    [k, 2] points, k <= n (points falling outside the field of view are dropped).
  """
  if n <= 0:
    return np.zeros((0, 2))
  dd = geometry.disc_diameter
  m = 3 * n + 8
  rad = np.sqrt(rng.uniform((r_in * dd)**2, (r_out * dd)**2, m))
  ang = rng.uniform(0, 2 * np.pi, m)
  p = np.asarray(centre) + rad[:, None] * np.stack([np.cos(ang), np.sin(ang)], -1)
  ok = np.hypot(p[:, 0], p[:, 1]) < geometry.fov_radius - 0.02
  if avoid_disc:
    ok &= np.hypot(p[:, 0] - geometry.disc[0], p[:, 1] - geometry.disc[1]) > 0.7 * dd
  return p[ok][:n]


def _blobs(rng, points, r_range, elongation=(1.0, 1.0), angle=None, strength=(0.8, 1.0)):
  n = len(points)
  r = rng.uniform(*r_range, n)
  e = rng.uniform(*elongation, n)
  ang = rng.uniform(0, np.pi, n) if angle is None else angle
  return np.c_[points, r * np.sqrt(e), r / np.sqrt(e), ang, rng.uniform(*strength, n)]


def _radial_angle(geometry, points):
  """Orientation of the nerve fibre layer at points: roughly radial from the disc."""
  return np.arctan2(points[:, 1] - geometry.disc[1], points[:, 0] - geometry.disc[0])


def _flames(rng, geometry, n, centre, r_in, r_out):
  p = _scatter(rng, geometry, n, centre, r_in, r_out)
  dd = geometry.disc_diameter
  return _blobs(rng, p, (0.07 * dd, 0.12 * dd), (2.5, 5.0), _radial_angle(geometry, p))


def _exudates(rng, geometry, n_clusters, per_cluster, dme: bool | None):
  """Hard exudates in clusters around the macula; dme forces (True) or forbids (False) some
  within one disc diameter of the fovea."""
  dd = geometry.disc_diameter
  centres = _scatter(rng, geometry, n_clusters, geometry.fovea, 0.4, 2.5)
  if dme and len(centres):
    centres[0] = _scatter(rng, geometry, 1, geometry.fovea, 0.0, 0.5, avoid_disc=False)[0]
  pts = [c + rng.normal(0, 0.25 * dd, (rng.integers(*per_cluster), 2)) for c in centres]
  pts = np.concatenate(pts) if pts else np.zeros((0, 2))
  pts = pts[np.hypot(pts[:, 0], pts[:, 1]) < geometry.fov_radius - 0.02]
  if dme is False:
    pts = pts[np.hypot(*(pts - geometry.fovea).T) > 1.15 * dd]
  return _blobs(rng, pts, (0.012 * dd, 0.04 * dd), (1.0, 2.0), strength=(0.6, 1.0))


def _tangle(rng, centre, n_loops, size, radius, cluster) -> np.ndarray:
  """Fine tortuous vessel loops around a centre (neovascularisation, IRMA)."""
  segs = []
  for _ in range(n_loops):
    steps = rng.integers(8, 16)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.7, steps))
    p = centre + rng.normal(0, size / 3, 2) + np.cumsum(
        size / 6 * np.stack([np.cos(heading), np.sin(heading)], -1), axis=0)
    segs.append(np.c_[p[:-1], p[1:], np.full((steps - 1, 2), radius), np.full(steps - 1, cluster)])
  return np.concatenate(segs)


def _vessel_points(tree: vessels.Tree, max_generation: int, geometry) -> np.ndarray:
  gen = tree.generation[tree.vessel]
  p = tree.points[gen <= max_generation]
  dd = geometry.disc_diameter
  far = np.hypot(*(p - geometry.disc).T) > 1.5 * dd
  inside = np.hypot(p[:, 0], p[:, 1]) < geometry.fov_radius - 0.05
  return p[far & inside]


def diabetic(rng, geometry, grade: int, dme: bool | None, veins: vessels.Tree) -> dict:
  """Lesions of diabetic retinopathy at ICDR grade `grade` (0-4).

  Grade 1: microaneurysms only. Grade 2: more than that (dot/blot and a few flame haemorrhages,
  exudates, cotton-wool spots) but short of severe. Grade 3 (4-2-1 rule): more than 20
  haemorrhages in each quadrant, venous beading in two or more quadrants and IRMA. Grade 4: new
  vessels at the disc and/or elsewhere on top of that.

  Args:
    rng: randomness.
    geometry: the eye's landmarks (anatomy.Geometry).
    grade: ICDR grade.
    dme: True forces exudates within one disc diameter of the fovea, False keeps them out,
      None leaves it to chance.
    veins: the vein tree (IRMA and new vessels elsewhere grow next to veins).

  Returns:
    dict of finding name -> lesion array, plus "beaded_veins" (vein ids) for grade 3+.
  """
  dd, f = geometry.disc_diameter, geometry.fovea
  out = {}
  if grade == 0:
    return out
  ma = {1: (2, 12), 2: (8, 25), 3: (15, 40), 4: (10, 35)}[grade]
  out["microaneurysms"] = _blobs(rng, _scatter(rng, geometry, rng.integers(*ma), f, 0.2, 3.0),
                                 (0.02 * dd, 0.03 * dd), strength=(0.8, 1.0))
  if grade == 1:
    return out
  if grade == 3:  # 4-2-1 rule: > 20 haemorrhages in every quadrant around the fovea
    quads = []
    for qx, qy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
      p = _scatter(rng, geometry, 120, f, 0.5, 3.5)
      quads.append(p[(np.sign(p[:, 0] - f[0]) == qx) & (np.sign(p[:, 1] - f[1]) == qy)][
          :rng.integers(22, 32)])
    haem_pts = np.concatenate(quads)
  else:
    haem_pts = _scatter(rng, geometry, rng.integers(*{2: (2, 12), 4: (10, 40)}[grade]), f, 0.4, 3.5)
  out["dot_blot_haemorrhages"] = _blobs(rng, haem_pts, (0.04 * dd, 0.09 * dd), (1.0, 1.6),
                                        strength=(0.6, 0.95))
  out["flame_haemorrhages"] = _flames(rng, geometry, rng.integers(*{2: (0, 4)}.get(grade, (3, 9))),
                                      geometry.disc, 0.8, 3.5)
  exudate_clusters = 1 if dme else rng.integers(0, 2 if grade == 2 else 4)
  out["hard_exudates"] = _exudates(rng, geometry, exudate_clusters, (4, 14), dme)
  out["cotton_wool_spots"] = _cotton_wool(rng, geometry, rng.integers(
      *{2: (0, 3)}.get(grade, (2, 6))))
  if grade >= 3:
    vein_main = np.nonzero(veins.generation == 0)[0][:4]  # the four arcade / nasal trunks
    out["beaded_veins"] = rng.choice(vein_main, rng.integers(2, 4) if grade == 3 else
                                     rng.integers(0, 2), replace=False)
    n_irma = rng.integers(1, 4) if grade == 3 else rng.integers(0, 3)
    sites = _vessel_points(veins, 1, geometry)
    sites = sites[rng.choice(len(sites), n_irma, replace=False)] if len(sites) else sites[:0]
    out["irma"] = _segments([_tangle(rng, s, 3, 0.35 * dd, 0.006 * dd, i)
                             for i, s in enumerate(sites)])
  if grade == 4:
    nv = []
    if rng.random() < 0.6:  # new vessels at the disc
      nv.append(_tangle(rng, np.asarray(geometry.disc), 10, 0.9 * dd, 0.008 * dd, 0))
    sites = _vessel_points(veins, 0, geometry)
    for i in range(rng.integers(0 if nv else 1, 3)):  # new vessels elsewhere, on the arcades
      nv.append(_tangle(rng, sites[rng.integers(len(sites))], 8, 0.6 * dd, 0.007 * dd, len(nv)))
    out["neovascularisation"] = _segments(nv)
  return out


def _segments(parts):
  return np.concatenate(parts) if parts else np.zeros((0, 7))


def _cotton_wool(rng, geometry, n):
  p = _scatter(rng, geometry, n, geometry.disc, 0.8, 3.0)
  dd = geometry.disc_diameter
  return _blobs(rng, p, (0.1 * dd, 0.17 * dd), (1.3, 2.5), _radial_angle(geometry, p) + np.pi / 2,
                strength=(0.5, 0.85))


def amd(rng, geometry, stage: int) -> dict:
  """Drusen, pigment change and geographic atrophy for simplified AREDS stage 0-3.

  Stage 1: medium drusen (63-125 um). Stage 2: large drusen (> 125 um) and/or pigment change.
  Stage 3: geographic atrophy, usually with drusen around it.

  Args:
    rng: randomness.
    geometry: the eye's landmarks (anatomy.Geometry).
    stage: simplified AREDS stage.

  Returns:
    dict of finding name -> lesion array.
  """
  dd, f = geometry.disc_diameter, geometry.fovea
  um = dd / 1800.0  # a disc is about 1.8 mm across
  out = {}
  if stage == 0:
    return out
  med = _blobs(rng, _scatter(rng, geometry, rng.integers(5, 20), f, 0.0, 1.5, False),
               (32 * um, 62 * um), (1.0, 1.3), strength=(0.5, 0.8))
  large = np.zeros((0, 6))
  pigment = np.zeros((0, 6))
  if stage >= 2:
    large = _blobs(rng, _scatter(rng, geometry, rng.integers(4, 20), f, 0.0, 1.6, False),
                   (64 * um, 140 * um), (1.0, 1.4), strength=(0.55, 0.9))
    if rng.random() < 0.6:
      pigment = _blobs(rng, _scatter(rng, geometry, rng.integers(3, 12), f, 0.0, 1.2, False),
                       (20 * um, 60 * um), (1.0, 2.0), strength=(0.5, 0.9))
  out["drusen"] = np.concatenate([med, large])
  out["pigment_change"] = pigment
  if stage == 3:
    p = _scatter(rng, geometry, rng.integers(1, 3), f, 0.0, 0.6, False)
    out["geographic_atrophy"] = _blobs(rng, p, (0.35 * dd, 0.75 * dd), (1.0, 1.6),
                                       strength=(0.8, 1.0))
  return out


def hypertensive(rng, geometry, grade: int, dme: bool | None) -> dict:
  """Signs of hypertensive retinopathy at Keith-Wagener-Barker grade 0-4.

  1: generalised arteriolar narrowing. 2: + arteriovenous nicking. 3: + flame haemorrhages,
  cotton-wool spots and exudates. 4: + papilloedema.

  AV nicking needs the vessel trees and is placed by the caller (vessels.nick_veins).

  Args:
    rng: randomness.
    geometry: the eye's landmarks (anatomy.Geometry).
    grade: Keith-Wagener-Barker grade.
    dme: as for `diabetic` (grade 3 exudates can form a macular star).

  Returns:
    dict with "artery_scale" (calibre factor of arteries), "papilloedema" (disc swelling 0-1)
    and lesion arrays.
  """
  out = {"artery_scale": 1.0, "papilloedema": 0.0}
  if grade >= 1:
    out["artery_scale"] = rng.uniform(0.55, 0.7)
  if grade >= 3:
    out["flame_haemorrhages"] = _flames(rng, geometry, rng.integers(3, 10), geometry.disc, 0.7, 3.0)
    out["cotton_wool_spots"] = _cotton_wool(rng, geometry, rng.integers(2, 6))
    out["hard_exudates"] = _exudates(rng, geometry, rng.integers(1 if dme else 0, 3), (4, 12), dme)
  if grade == 4:
    out["papilloedema"] = rng.uniform(0.6, 1.0)
  return out


def glaucoma_disc(rng, geometry, cdr: float, glaucomatous: bool) -> dict:
  """Cup shape (and disc haemorrhage) for a given vertical cup-to-disc ratio.

  Glaucomatous cups are vertically elongated and shifted towards one pole (focal rim thinning,
  usually inferior); a third carry a splinter haemorrhage at the disc margin.

  Args:
    rng: randomness.
    geometry: the eye's landmarks (anatomy.Geometry).
    cdr: vertical cup-to-disc ratio.
    glaucomatous: whether the disc is glaucomatous.

  Returns:
    {"cup": anatomy.draw_disc cup parameters} plus "disc_haemorrhage" when there is one.
  """
  dd = geometry.disc_diameter
  if glaucomatous:
    pole = 1.0 if rng.random() < 0.7 else -1.0  # +y: inferior
    cup = {"cdr_v": cdr, "cdr_h": cdr * rng.uniform(0.75, 0.9),
           "offset": (0.0, pole * (1 - cdr) * rng.uniform(0.3, 0.6))}
  else:
    cup = {"cdr_v": cdr, "cdr_h": min(cdr * rng.uniform(0.9, 1.1), 0.95),
           "offset": (-np.sign(geometry.nasal_sign) * rng.uniform(0.0, 0.1), 0.0)}
  out = {"cup": cup}
  if glaucomatous and rng.random() < 0.35:
    rx, ry = geometry.disc_radii
    a = np.pi / 2 + rng.uniform(-0.5, 0.5) * geometry.nasal_sign
    p = np.asarray(geometry.disc) + np.array([[rx * np.cos(a), ry * np.sin(a)]]) * 1.02
    out["disc_haemorrhage"] = _blobs(rng, p, (0.06 * dd, 0.08 * dd), (4.0, 6.0),
                                     _radial_angle(geometry, p))
  return out
