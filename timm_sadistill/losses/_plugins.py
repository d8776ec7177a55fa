"""Losses of other packages: a package makes its losses known to the command line by an entry point in the group
``timm_sadistill.losses`` naming the module that registers them (pyproject.toml)::

    [project.entry-points."timm_sadistill.losses"]
    sp = "my_package.sp_loss"

The parsers import every such module (`load_loss_plugins`) before they are built, so ``--distill sp`` and
``--sp-weight`` exist with no edit of ours. In Python, importing the module is enough.
"""
from importlib.metadata import entry_points
from typing import List

from ..errors import UsageError

__all__ = ['load_loss_plugins', 'PLUGIN_GROUP']

PLUGIN_GROUP = 'timm_sadistill.losses'


def load_loss_plugins() -> List[str]:
    """Import the module of every entry point in the group ``timm_sadistill.losses`` (it registers its losses); the
    entry points' names. The command line calls this before building its parsers."""
    loaded = []
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as e:
            raise UsageError(f"The distillation-loss plugin '{point.name}' ({point.value}, entry point group "
                             f"{PLUGIN_GROUP}) does not import: {type(e).__name__}: {e}; fix or uninstall it.") from e
        loaded.append(point.name)
    return loaded
