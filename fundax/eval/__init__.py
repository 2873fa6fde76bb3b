"""Independent evaluation of generated fundus images: nothing here shares weights or training
data with the Selector, the reward model the generator is optimised against.

Modules:
  evaluator        multi-task fundus CNN (DR, DME, CDR, AMD, hypertensive, quality, laterality);
                   `load_evaluator(dir)` -> .features(images), .predict(images)
  evaluator_train  `train_evaluator(config, workdir)` on phantom images (configs/evaluator.py)
  metrics          Fréchet distance, KID, k-NN precision/recall; Inception loading hook
  ssim             SSIM, MS-SSIM, within-prompt diversity
  consistency      prompt vs evaluator agreement, quadratic weighted kappa, AUROC
  anatomy_checks   vessel density (Frangi) and optic-disc side, validated on the phantom
  privacy          nearest-training-image audit in pixel and feature space
  utility          TSTR DR-grade classifier: QWK and referable-DR AUROC
  report           the self-contained HTML report
  run              `evaluate(...)`: all of the above -> metrics.json + report.html
"""
