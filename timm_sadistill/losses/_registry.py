"""Registry of distillation losses, in the manner of timm's model registry.

``loss_options(name)`` is the one place that reads a loss's constructor: the factory checks options against it,
the command line asks it whether a method takes a temperature, and ``stages`` which connector a method builds.
"""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Type, TypeVar

from ..errors import UsageError
from .base import DistillLoss

__all__ = [
    'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class',
    'loss_options', 'LossOptions', 'REQUIRED',
]

_LOSSES: Dict[str, Type[DistillLoss]] = {}
LossClass = TypeVar('LossClass', bound=Type[DistillLoss])

REQUIRED = inspect.Parameter.empty  # the default of an option that has none


@dataclass(frozen=True)
class LossOptions:
    """The keyword options a registered loss's constructor takes.

    defaults: option -> default (`REQUIRED` when it has none), in the constructor's order; the channel counts
        (``student_channels``, ``teacher_channels``) are options like any other.
    takes_any: the constructor also takes ``**kwargs``, so options beyond ``defaults`` pass through to it.
    """
    defaults: Dict[str, Any]
    takes_any: bool


def register_distill_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator that makes a `DistillLoss` subclass available as ``create_distill_loss(name)``.

    Raises:
        ValueError: when ``name`` is taken; TypeError when the class is not a `DistillLoss`.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"A distillation loss name must be a non-empty string, got {name!r}.")

    def register(cls: LossClass) -> LossClass:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise UsageError(f"@register_distill_loss('{name}') decorates DistillLoss subclasses, got {cls!r}.")
        if name in _LOSSES:
            taken = _LOSSES[name]
            raise UsageError(
                f"Distillation loss '{name}' is already registered by {taken.__module__}.{taken.__qualname__}; "
                f"pick another name (taken: {', '.join(list_distill_losses())})."
            )
        _LOSSES[name] = cls
        cls.loss_name = name
        return cls

    return register


def list_distill_losses() -> List[str]:
    """Sorted names of the registered distillation losses."""
    return sorted(_LOSSES)


def get_distill_loss_class(name: str) -> Type[DistillLoss]:
    """The class registered as ``name``; ValueError listing the registered names when there is none."""
    if name not in _LOSSES:
        raise UsageError(f"Unknown distillation loss '{name}'; registered: {', '.join(list_distill_losses())}.")
    return _LOSSES[name]


def loss_options(name: str) -> LossOptions:
    """Which options the loss registered as ``name`` takes, with which defaults: ``loss_options('cwd').defaults``
    is ``{'student_channels': (), 'teacher_channels': (), 'tau': 4.0, 'weight': 3.0, 'connector': 'conv1x1'}``."""
    parameters = list(inspect.signature(get_distill_loss_class(name).__init__).parameters.values())[1:]  # not self
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return LossOptions(
        defaults={p.name: p.default for p in parameters if p.kind in named},
        takes_any=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters),
    )


def create_distill_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as ``name``: ``create_distill_loss('sa', student_channels=[64], teacher_channels=[256])``.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
        TypeError: for an option the loss does not take (the message lists those it takes).
    """
    options = loss_options(name)
    unknown = [k for k in kwargs if k not in options.defaults]
    if unknown and not options.takes_any:
        raise UsageError(f"Distillation loss '{name}' takes no option {', '.join(map(repr, unknown))}; "
                        f"it takes {', '.join(options.defaults)}.")
    return get_distill_loss_class(name)(**kwargs)
