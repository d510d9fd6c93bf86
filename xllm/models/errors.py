class ModelLoadError(ValueError):
    """A model could not be found or read; the message says which file and why."""
