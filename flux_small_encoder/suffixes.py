"""What kind of file a name is, by its suffix: one list for resolving names (`registry`), reading (`checkpoint`),
writing (`convert`) and checking what a training checkpoint holds (`training.state`)."""

# Pickled files (`torch.save`, the reference trainer's `.pth`, accelerate's `.pkl`): the package reads state dicts of
# tensors from them only through `pickled`, never with full unpickling, and writes none.
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
# A name ending so is a checkpoint file, never a registry name or a Hub repo id.
CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".json", *PICKLE_SUFFIXES)
