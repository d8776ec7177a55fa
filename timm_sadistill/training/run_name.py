"""The name of a run folder: ``--experiment`` when given, else timm's timestamp name
``<date>-<time>-<model>-<input size>`` (as timm's train.py names its output folder), numbered ``-1``, ``-2``, ... when
taken, as ``timm.utils.get_outdir(inc=True)`` does."""
from datetime import datetime
from typing import Optional

from timm.models import safe_model_name

__all__ = ['timestamp_name', 'run_folder_name']


def timestamp_name(model: str, img_size: int, now: Optional[datetime] = None) -> str:
    """timm's name for a run of ``model`` at ``img_size`` px started ``now``: ``20261201-210311-resnet18-224``."""
    return '-'.join([(now or datetime.now()).strftime('%Y%m%d-%H%M%S'), safe_model_name(model), str(img_size)])


def run_folder_name(name: str, number: int = 0) -> str:
    """``name`` for the first folder of that name, ``<name>-<number>`` for the ``number``-th one after it."""
    return f'{name}-{number}' if number else name
