"""The Selector: the learned judge of generated fundus images.

Modules: ratings (the feedback export reader), data (graded images and ratings as one masked
table, mixed batches), text (prompt embeddings), losses (masked BCE, Bradley-Terry), threshold
(acceptance threshold, ROC/PR/calibration, plots), train (`train_selector`), score
(`score_images`), synthetic (a simulated rating export for demos and tests). The network itself
is `fundax.models.selector.Selector`.
"""
