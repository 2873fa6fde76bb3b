"""A phantom case: every parameter of one synthetic eye, and the sampler of realistic case mixes.

`sample_case(rng, **constraints)` draws a `Case` from a numpy Generator: the clinical state
(grades, cup-to-disc ratio, pigmentation, quality), the geometry, both vessel trees and every
lesion, all in normalised image coordinates. Nothing here depends on the output resolution, so
`render(case, 128)` and `render(case, 512)` show the same eye. Constraints fix any clinical field
of `FundusLabels` (e.g. dr_grade=4, laterality="left", quality="reject") and the rest is drawn from
a case mix that is mostly healthy, good-quality eyes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from fundax.data import labels as labels_lib
from fundax.data.phantom import anatomy
from fundax.data.phantom import pathology
from fundax.data.phantom import quality as quality_lib
from fundax.data.phantom import raster
from fundax.data.phantom import vessels

# Case mix of the sampler when a field is not constrained (probabilities per value).
CASE_MIX = {
    "laterality": (0.5, 0.5),
    "field": (0.7, 0.3),
    "pigmentation": (0.3, 0.5, 0.2),
    "quality": (0.75, 0.17, 0.08),
    "dr_grade": (0.70, 0.10, 0.10, 0.05, 0.05),
    "amd_stage": (0.86, 0.06, 0.05, 0.03),
    "hypertensive_grade": (0.86, 0.06, 0.04, 0.03, 0.01),
    "glaucoma": 0.08,
}
GLAUCOMA_CDR = 0.65  # the phantom's glaucomatous discs have a vertical CDR at least this large
VEIN_RADIUS = 0.013  # main vein radius at the disc, normalised (about 7 px across at 512 px)
ARTERY_VEIN_RATIO = 0.72  # healthy arteriolar-to-venular calibre ratio
CONSTRAINTS = ("laterality", "field", "quality", "pigmentation", "dr_grade", "dme", "cdr",
               "glaucoma", "amd_stage", "hypertensive_grade", "quality_defects")
BLOB_FINDINGS = ("microaneurysms", "dot_blot_haemorrhages", "flame_haemorrhages", "hard_exudates",
                 "cotton_wool_spots", "drusen", "pigment_change", "geographic_atrophy",
                 "disc_haemorrhage")
SEGMENT_FINDINGS = ("neovascularisation", "irma")
_CHOICES = {"laterality": labels_lib.LATERALITIES, "field": labels_lib.FIELDS,
            "quality": labels_lib.QUALITIES, "pigmentation": labels_lib.PIGMENTATIONS}
_RANGES = {"dr_grade": 4, "amd_stage": 3, "hypertensive_grade": 4}
_MAX_ATTEMPTS = 20  # redraws when a graded sign fell outside the field of view
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Case:
  """Everything needed to draw one phantom eye (resolution-independent)."""

  params: dict[str, Any]  # the sampled clinical state and scalar parameters (JSON-able)
  geometry: anatomy.Geometry
  arteries: vessels.Tree
  veins: vessels.Tree
  crossings: np.ndarray  # [k, 4] artery-vein crossings (x, y, artery r, vein r)
  nicked: np.ndarray  # indices into crossings narrowed by AV nicking
  beaded_veins: np.ndarray  # vein ids with venous beading
  blobs: dict[str, np.ndarray]  # BLOB_FINDINGS name -> [n, 6] (pathology.BLOB_COLUMNS)
  segments: dict[str, np.ndarray]  # SEGMENT_FINDINGS name -> [m, 7] (pathology.SEGMENT_COLUMNS)
  texture: tuple[np.ndarray, ...]  # noise grids for anatomy.background (from texture_seed)
  defects: dict[str, dict]  # quality defect -> parameters (quality.sample_defects)

  def count(self, finding: str) -> int:
    """Number of drawn instances of a finding (clusters for vascular lesions)."""
    if finding in self.blobs:
      return len(self.blobs[finding])
    if finding in self.segments:
      seg = self.segments[finding]
      return len(np.unique(seg[:, 6])) if len(seg) else 0
    info = self.params
    return {"venous_beading": len(self.beaded_veins), "av_nicking": len(self.nicked),
            "arteriolar_narrowing": int(info["artery_scale"] < 1.0),
            "papilloedema": int(info["papilloedema"] > 0)}.get(finding, 0)

  @property
  def dme(self) -> bool:
    """Hard exudates within one disc diameter of the fovea (computed from the drawn positions)."""
    ex = self.blobs.get("hard_exudates", np.zeros((0, 6)))
    d = np.hypot(ex[:, 0] - self.geometry.fovea[0], ex[:, 1] - self.geometry.fovea[1])
    return bool((d <= self.geometry.disc_diameter).any())

  def labels(self) -> labels_lib.FundusLabels:
    """The clinical summary; findings counts equal what is drawn."""
    i = self.params
    return labels_lib.FundusLabels(
        laterality=i["laterality"], field=i["field"], quality=i["quality"],
        dr_grade=i["dr_grade"], dme=self.dme, cdr=round(i["cdr"], 3), glaucoma=i["glaucoma"],
        amd_stage=i["amd_stage"], hypertensive_grade=i["hypertensive_grade"],
        pigmentation=i["pigmentation"],
        findings={f: self.count(f) for f in labels_lib.FINDINGS},
        quality_defects=tuple(d for d in labels_lib.QUALITY_DEFECTS if d in self.defects))

  def record(self) -> dict[str, Any]:
    """JSON-serialisable record of every sampled parameter, lesion and derived figure."""
    g = self.geometry
    return {
        "params": dict(self.params),
        "geometry": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in dataclasses.asdict(g).items()},
        "vessels": {"arteries": self.arteries.num_vessels, "veins": self.veins.num_vessels,
                    "crossings": np.round(self.crossings[:, :2], 5).tolist(),
                    "nicked_crossings": self.nicked.tolist(),
                    "beaded_veins": self.beaded_veins.tolist()},
        "lesions": {k: _columns(v, pathology.BLOB_COLUMNS) for k, v in self.blobs.items()},
        "vascular_lesions": {k: _columns(v, pathology.SEGMENT_COLUMNS)
                             for k, v in self.segments.items()},
        "quality_defects": self.defects,
        "labels": self.labels().to_dict(),
    }


def _columns(table: np.ndarray, names: tuple[str, ...]) -> dict[str, list[float]]:
  """A lesion table [n, k] as {column name: list of n values} (rounded for a compact record)."""
  return dict(zip(names, np.round(table, 5).T.tolist())) if len(table) else {c: [] for c in names}


def check_constraints(constraints: dict[str, Any]) -> None:
  """Raises ValueError naming the field for an unknown or out-of-range constraint."""
  for name, value in constraints.items():
    if name not in CONSTRAINTS:
      raise ValueError(f"unknown constraint {name!r}; known: {CONSTRAINTS}")
    if value is None:
      continue
    if name in _CHOICES and value not in _CHOICES[name]:
      raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
    if name in _RANGES and not (isinstance(value, (int, np.integer)) and not isinstance(
        value, bool) and 0 <= value <= _RANGES[name]):
      raise ValueError(f"{name} must be an int in [0, {_RANGES[name]}], got {value!r}")
    if name in ("dme", "glaucoma") and not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name} must be a bool, got {value!r}")
    if name == "cdr" and not (isinstance(value, (int, float)) and 0.05 <= value <= 0.95):
      raise ValueError(f"cdr must be a number in [0.05, 0.95], got {value!r}")
    if name == "quality_defects":
      bad = [d for d in value if d not in labels_lib.QUALITY_DEFECTS]
      if isinstance(value, str) or bad:
        raise ValueError(f"quality_defects must be a tuple of {labels_lib.QUALITY_DEFECTS}, "
                         f"got {value!r}")
  c = constraints
  if c.get("cdr") is not None and c.get("glaucoma") is not None and (
      (c["cdr"] >= GLAUCOMA_CDR) != c["glaucoma"]):
    raise ValueError(f"glaucoma={c['glaucoma']} contradicts cdr={c['cdr']} (the phantom's "
                     f"glaucomatous discs are exactly those with cdr >= {GLAUCOMA_CDR})")
  if c.get("dme") and c.get("dr_grade") in (0, 1) and (c.get("hypertensive_grade") or 0) < 3:
    raise ValueError(f"dme=True needs exudates: dr_grade >= 2 or hypertensive_grade >= 3, got "
                     f"dr_grade={c['dr_grade']}")
  if c.get("quality") == "good" and c.get("quality_defects"):
    raise ValueError(f"quality_defects {c['quality_defects']} contradict quality='good'")


def _pick(rng, name, constraints, values):
  if constraints.get(name) is not None:
    return constraints[name]
  v = values[rng.choice(len(values), p=CASE_MIX[name])]
  return v.item() if isinstance(v, np.generic) else v


def _clinical_state(rng, c: dict) -> dict:
  c = dict(c)
  if c.get("quality") is None and "quality_defects" in c:  # the defects decide good or not
    if not c["quality_defects"]:
      c["quality"] = "good"
    else:
      c["quality"] = "usable" if rng.random() < CASE_MIX["quality"][1] / sum(
          CASE_MIX["quality"][1:]) else "reject"
  s = {name: _pick(rng, name, c, vals) for name, vals in _CHOICES.items()}
  for name, top in _RANGES.items():
    s[name] = int(_pick(rng, name, c, tuple(range(top + 1))))
  if c.get("dme") and c.get("dr_grade") is None and s["hypertensive_grade"] < 3:
    s["dr_grade"] = int(rng.integers(2, 5))  # DME needs exudates
  if c.get("cdr") is not None:
    s["cdr"] = float(c["cdr"])
    s["glaucoma"] = s["cdr"] >= GLAUCOMA_CDR
  else:
    g = c.get("glaucoma")
    s["glaucoma"] = bool(rng.random() < CASE_MIX["glaucoma"]) if g is None else bool(g)
    s["cdr"] = float(rng.uniform(GLAUCOMA_CDR, 0.9) if s["glaucoma"] else
                     np.clip(rng.normal(0.35, 0.1), 0.15, 0.6))
  return s


def _geometry(rng, state: dict, shift: np.ndarray) -> anatomy.Geometry:
  dd = rng.uniform(0.2, 0.24)
  nasal = 1.0 if state["laterality"] == "right" else -1.0
  # the disc centre sits a little above the fovea; their distance is about 2.5 disc diameters
  dist, drop = rng.uniform(2.3, 2.7) * dd, rng.uniform(0.05, 0.3) * dd
  jitter = rng.normal(0, 0.03, 2)
  if state["field"] == "macula":
    fovea = jitter + shift
    disc = fovea + np.array([nasal * dist, -drop])
  else:
    disc = jitter + shift
    fovea = disc - np.array([nasal * dist, -drop])
  return anatomy.Geometry(fovea=tuple(float(v) for v in fovea),
                          disc=tuple(float(v) for v in disc), disc_diameter=float(dd),
                          disc_aspect=float(rng.uniform(1.0, 1.12)),
                          fov_radius=float(rng.uniform(0.93, 0.98)), nasal_sign=nasal)


def sample_case(rng: np.random.Generator, **constraints) -> Case:
  """Draws a random case, honouring any constraints.

  Args:
    rng: numpy Generator; the case is a pure function of its state and the constraints.
    **constraints: any of CONSTRAINTS (the clinical fields of FundusLabels plus quality_defects);
      None means unconstrained.

  Returns:
    The case.

  Raises:
    ValueError: naming the field, for unknown, out-of-range or contradictory constraints.
  """
  check_constraints(constraints)
  c = {k: v for k, v in constraints.items() if v is not None}
  for _ in range(_MAX_ATTEMPTS):
    case = _sample(rng, c)
    if _consistent(case, c):
      return case
    _log.debug("redrawing a case whose drawn signs do not match its grades (%s)", constraints)
  raise RuntimeError(f"no consistent case for {constraints} in {_MAX_ATTEMPTS} attempts")


def _consistent(case: Case, c: dict) -> bool:
  """Whether every graded sign is actually drawn (lesions can fall outside an off-centre field)
  and a requested DME label came out of the drawn exudates."""
  i, n = case.params, case.count
  needed = [(i["dr_grade"] >= 1, "microaneurysms"), (i["dr_grade"] == 4, "neovascularisation"),
            (i["amd_stage"] >= 1, "drusen"), (i["amd_stage"] == 3, "geographic_atrophy"),
            (i["hypertensive_grade"] >= 2, "av_nicking")]
  if any(need and n(f) == 0 for need, f in needed):
    return False
  return c.get("dme") is None or case.dme == c["dme"]


def _sample(rng, c: dict) -> Case:
  """One draw of a case for validated constraints (see sample_case)."""
  state = _clinical_state(rng, c)
  defects = quality_lib.sample_defects(rng, state["quality"], c.get("quality_defects"))
  shift = np.zeros(2)
  if "off_centre" in defects:
    a = defects["off_centre"]["angle"]  # anatomy moves away from the shaded side
    shift = -(0.1 + 0.3 * defects["off_centre"]["severity"]) * np.array([np.cos(a), np.sin(a)])
  geo = _geometry(rng, state, shift)
  disc, fovea = np.asarray(geo.disc), np.asarray(geo.fovea)
  hr = pathology.hypertensive(rng, geo, state["hypertensive_grade"], c.get("dme"))
  vein_r = VEIN_RADIUS * rng.uniform(0.9, 1.1)
  artery_r = vein_r * ARTERY_VEIN_RATIO * rng.uniform(0.93, 1.07) * hr["artery_scale"]
  tree_seeds = rng.integers(2**31, size=2)  # the trees (and the texture) are recorded as seeds
  # the central artery emerges on the nasal side of the cup, the vein on the temporal side
  side = np.array([geo.nasal_sign * 0.12 * geo.disc_diameter, 0.0])
  arteries = vessels.grow_tree(np.random.default_rng(tree_seeds[0]), disc + side, fovea,
                               geo.disc_diameter, geo.nasal_sign, geo.fov_radius, artery_r)
  veins = vessels.grow_tree(np.random.default_rng(tree_seeds[1]), disc - side, fovea,
                            geo.disc_diameter, geo.nasal_sign, geo.fov_radius, vein_r)
  cross = vessels.crossings(arteries, veins)
  # crossings on the disc or at the rim of the field are not gradable for AV nicking
  cross = cross[(np.hypot(*(cross[:, :2] - disc).T) > geo.disc_diameter) &
                (np.hypot(cross[:, 0], cross[:, 1]) < geo.fov_radius - 0.1)]
  nicked = np.zeros(0, int)
  if state["hypertensive_grade"] >= 2 and len(cross):
    nicked = np.sort(rng.choice(len(cross), min(len(cross), int(rng.integers(2, 5))),
                                replace=False))
    veins = vessels.nick_veins(veins, cross[nicked, :2], 0.25 * geo.disc_diameter, 0.7)
  dr = pathology.diabetic(rng, geo, state["dr_grade"], c.get("dme"), veins)
  beaded = np.asarray(dr.pop("beaded_veins", np.zeros(0, int)), int)
  if len(beaded):
    veins = vessels.bead_veins(veins, beaded, 0.2 * geo.disc_diameter, 0.6)
  found = [dr, pathology.amd(rng, geo, state["amd_stage"]),
           pathology.glaucoma_disc(rng, geo, state["cdr"], state["glaucoma"]), hr]
  blobs = {f: np.concatenate([d[f] for d in found if f in d] + [np.zeros((0, 6))])
           for f in BLOB_FINDINGS}
  segments = {f: dr.get(f, np.zeros((0, 7))) for f in SEGMENT_FINDINGS}
  info = dict(state, artery_scale=float(hr["artery_scale"]), papilloedema=float(hr["papilloedema"]),
              cup={k: (list(v) if isinstance(v, tuple) else float(v))
                   for k, v in found[2]["cup"].items()},
              tessellation=float({"light": 0.5, "medium": 0.25, "dark": 0.1}[state["pigmentation"]]
                                 * rng.uniform(0.3, 1.2)),
              vignetting=float(rng.uniform(0.15, 0.3)), artery_radius=float(artery_r),
              vein_radius=float(vein_r), tree_seeds=[int(s) for s in tree_seeds],
              texture_seed=int(rng.integers(2**31)),
              shift=[float(v) for v in shift])
  texture_rng = np.random.default_rng(info["texture_seed"])
  texture = tuple(raster.noise_grid(texture_rng, cells) for cells in anatomy.texture_cells())
  return Case(params=info, geometry=geo, arteries=arteries, veins=veins, crossings=cross,
              nicked=nicked, beaded_veins=beaded, blobs=blobs, segments=segments,
              texture=texture, defects=defects)
