"""Registry of distillation losses, in the manner of timm's model registry."""
import inspect
from typing import Callable, Dict, List, Type, TypeVar

from .losses.base import DistillLoss

__all__ = ['register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class']

_LOSSES: Dict[str, Type[DistillLoss]] = {}
LossClass = TypeVar('LossClass', bound=Type[DistillLoss])


def register_distill_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator that makes a `DistillLoss` subclass available as ``create_distill_loss(name)``.

    Raises:
        ValueError: when ``name`` is taken; TypeError when the class is not a `DistillLoss`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A distillation loss name must be a non-empty string, got {name!r}.")

    def register(cls: LossClass) -> LossClass:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise TypeError(f"@register_distill_loss('{name}') decorates DistillLoss subclasses, got {cls!r}.")
        if name in _LOSSES:
            taken = _LOSSES[name]
            raise ValueError(
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
        raise ValueError(f"Unknown distillation loss '{name}'; registered: {', '.join(list_distill_losses())}.")
    return _LOSSES[name]


def create_distill_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as ``name``: ``create_distill_loss('sa', student_channels=[64], teacher_channels=[256])``.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
        TypeError: for an option the loss does not take (the message lists those it takes).
    """
    cls = get_distill_loss_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params or k == 'self']
    if unknown and not takes_any:
        accepted = [k for k in params if k != 'self' and params[k].kind is not inspect.Parameter.VAR_POSITIONAL]
        raise TypeError(f"Distillation loss '{name}' takes no option {', '.join(map(repr, unknown))}; it takes {', '.join(accepted)}.")
    return cls(**kwargs)
