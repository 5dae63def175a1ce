"""The Seed1.5-VL training recipe: recipes as data, embedded spatial data, a manifest loader, the
packer, the training loop, checkpoints and logs. ``python trainer/run.py`` is the main job."""
