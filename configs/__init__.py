"""fundax's job configs, one file per job (main, data, vae, ldm, sd15_fundus, selector, ...).

Each file's `get_config(arg=None)` returns a locked `ml_collections.ConfigDict`; variants are
arguments (`main:tiny`). setup.py ships this folder as the package `fundax.configs`, so
`fundax.configlib.load_config` finds a config by name from any directory, with or without a
checkout. The files are loaded by path, never imported as `fundax.configs.<name>`.
"""
