"""Independent evaluation of generated fundus images: nothing here shares weights or training
data with the Selector, the reward model the generator is optimised against.

Modules:
  evaluator        multi-task fundus CNN (DR, DME, CDR, AMD, hypertensive, quality, laterality,
                   field); `load_evaluator(dir)` -> .features, .predict, .readable
  evaluator_train  `train_evaluator(config, workdir)` on phantom images (configs/evaluator.py)
  metrics          Fréchet distance, KID, k-NN precision/recall; Inception loading hook
  ssim             SSIM, MS-SSIM, within-prompt diversity
  consistency      prompt vs evaluator agreement, quadratic weighted kappa, AUROC
  anatomy_checks   field of view, optic disc, fovea, vessels: detectors without learning,
                   validated against phantom masks (bench/detectors.py)
  privacy          nearest-training-image audit in pixel and feature space
  utility          TSTR DR-grade classifier: QWK and referable-DR AUROC
  c2st             classifier two-sample test with a 95% interval
  references       prompt-matched phantoms and negative controls: every figure's floor/ceiling
  readings         one image set read by every judge; the value | phantoms | control table
  report           the self-contained HTML report
  run              `evaluate(...)`: all of the above -> metrics.json + report.html
"""
