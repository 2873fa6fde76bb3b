"""The procedural fundus world: labelled synthetic colour fundus photographs with known truth.

    from fundax.data import phantom
    case = phantom.sample_case(np.random.default_rng(0), dr_grade=4, laterality="left")
    sample = phantom.render(case, 256)  # .image, .masks, .labels, .record
    sample = phantom.generate(seed=0, resolution=128, quality="reject")

Deterministic by seed and resolution-independent (geometry lives in normalised coordinates).
Modules: case (parameters and case mix), anatomy (background, macula, disc, field of view),
vessels (tree growth and drawing), pathology (lesion sampling), lesions (lesion drawing),
quality (defects and EyeQ grade), raster (vectorised primitives), render (the image).
"""

from fundax.data.phantom.case import CASE_MIX
from fundax.data.phantom.case import CONSTRAINTS
from fundax.data.phantom.case import Case
from fundax.data.phantom.case import sample_case
from fundax.data.phantom.quality import grade_quality
from fundax.data.phantom.render import MASK_NAMES
from fundax.data.phantom.render import MIN_RESOLUTION
from fundax.data.phantom.render import PhantomSample
from fundax.data.phantom.render import generate
from fundax.data.phantom.render import generate_images
from fundax.data.phantom.render import render

__all__ = ["CASE_MIX", "CONSTRAINTS", "Case", "sample_case", "grade_quality", "MASK_NAMES",
           "MIN_RESOLUTION", "PhantomSample", "generate", "generate_images", "render"]
