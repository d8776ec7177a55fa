"""A training run as ``timm-sadistill train`` makes it: the data and its checks, the loop, the run folder, crash-safe
checkpoints and the exported model folder. `train` takes timm train.py's parsed flags (``cli.train.parse_args``) and
what the command line derives from them: the teacher and the task's keyword arguments."""
from .run import train

__all__ = ['train']
