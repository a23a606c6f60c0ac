"""What a model folder records about how it was made: a file name shared by the trainer, the model card and `convert`.

A module of its own that imports nothing, so that reading a folder's provenance does not load the training package.
"""

# The trainer's resolved config, saved in every student folder it writes (`final/`, `checkpoint-N/student/`).
TRAINING_CONFIG_NAME = "training_config.yaml"
