"""fundax: synthetic colour fundus photographs from clinical text, in JAX/Flax."""

__version__ = "0.1.0"
