"""Train state, optimizers, pure `*_step` functions and loop helpers."""
