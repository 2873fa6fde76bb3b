"""Jobs: `run(config, workdir)` functions that are short sequences of library calls."""
