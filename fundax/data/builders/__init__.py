"""fundax's TFDS dataset builders, written as array_record and read without TensorFlow.

  features        the feature schema every builder shares, and `decode_example`
  fundus_phantom  the procedural phantom (`fundax.data.phantom`) as a dataset
  manual          the base of the real-dataset builders: manual_dir checks, bad files, summary
  dr_grading      EyePACS, APTOS 2019, IDRiD, EyeQ, Messidor-2
  odir5k          ODIR-5K

`fundax.data.datasets` builds, loads and summarises them by name.
"""
