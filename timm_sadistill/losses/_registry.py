"""Registry of distillation losses, in the manner of timm's model registry: `register_distill_loss` and
`create_distill_loss`.

A loss's options are declared once, in its constructor (`timm_sadistill.losses._loss_options` reads them)::

    @register_distill_loss('sp')
    class SPLoss(DistillLoss):
        '''...

        Args:
            weight: weight of the similarity term.
            mode: which Gram matrix to compare.
        '''
        def __init__(self, student_channels=(), teacher_channels=(),
                     weight: Annotated[float, NonNegative] = 3000.0, mode: Literal['batch', 'channel'] = 'batch'):

To add an option: add a typed, defaulted, documented constructor parameter; nothing else. Everything else derives
from it (`loss_options` is the one reader): the check of every value, by construction and the factories (a type,
NaN, inf, a bound, a choice; `check_loss_options`, named in the message), the command line's ``--<loss>-<option>``
flags of ``train``, ``timm-train`` and ``viz``, the options a run records in args.yaml and its model card, and what
``--resume`` compares. `register_distill_loss` refuses, when the class is defined, an option without a type, a
default or a help line. Losses of other packages reach the command line through entry points
(`timm_sadistill.losses._plugins`).
"""
import inspect
from functools import wraps
from typing import Any, Callable, Dict, List, Optional, Type, TypeVar, Union

from ..errors import UsageError
from ._loss_options import LossOptions, read_options
from .base import DistillLoss

__all__ = [
    'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class',
    'default_distill_loss', 'loss_options', 'check_loss_options',
]

_LOSSES: Dict[str, Type[DistillLoss]] = {}
_DECLARED: Dict[type, LossOptions] = {}  # each registered class's options, read once when it registers
_DEFAULT: List[str] = []  # the name registered with default=True
LossClass = TypeVar('LossClass', bound=Type[DistillLoss])


def _checking_init(cls: Type[DistillLoss], declared: LossOptions) -> Callable:
    """``cls.__init__`` that checks the options it is given first (`check_loss_options`: the one place a value is
    checked in Python) and records them (defaults included) as ``loss.option_values``."""
    init = cls.__init__
    signature = inspect.signature(init)

    @wraps(init)
    def __init__(self, *args, **kwargs):
        check_loss_options(cls, kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {name: bound.arguments[name] for name in declared.options}
        check_loss_options(cls, {k: v for k, v in values.items() if k not in kwargs})  # positional ones
        init(self, *args, **kwargs)
        self.option_values = values

    return __init__


def register_distill_loss(name: str, default: bool = False) -> Callable[[LossClass], LossClass]:
    """Class decorator that makes a `DistillLoss` subclass available as ``create_distill_loss(name)``.

    Reads the class's options (see the module docstring) and refuses a declaration that lacks a type, a default or
    a help line; construction then checks each option's value against its declaration. ``default=True`` makes it
    the loss a task uses when given none (`default_distill_loss`); one loss may be.

    Raises:
        UsageError: when ``name`` is taken, the class is not a `DistillLoss`, or an option is not declared in full.
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
        if default and _DEFAULT and _DEFAULT[0] in _LOSSES:
            raise UsageError(f"'{_DEFAULT[0]}' is already the default distillation loss; register '{name}' without "
                             "default=True.")
        declared = read_options(cls)
        cls.__init__ = _checking_init(cls, declared)
        _DECLARED[cls] = declared
        _LOSSES[name] = cls
        cls.loss_name = name
        if default:
            _DEFAULT[:] = [name]
        return cls

    return register


def list_distill_losses(filter: Optional[Callable[[Type[DistillLoss]], bool]] = None) -> List[str]:
    """Sorted names of the registered distillation losses; with ``filter``, of those whose class it accepts, e.g.
    ``list_distill_losses(lambda cls: cls.draws_attention_maps)``."""
    return sorted(name for name, cls in _LOSSES.items() if filter is None or filter(cls))


def get_distill_loss_class(name: str) -> Type[DistillLoss]:
    """The class registered as ``name``; ValueError listing the registered names when there is none."""
    if name not in _LOSSES:
        raise UsageError(f"Unknown distillation loss '{name}'; registered: {', '.join(list_distill_losses())}.")
    return _LOSSES[name]


def default_distill_loss() -> str:
    """The name of the loss a task uses when given none: the one registered with ``default=True``."""
    if not _DEFAULT or _DEFAULT[0] not in _LOSSES:
        raise UsageError("No distillation loss is registered as the default; pass loss=<name> "
                         f"({', '.join(list_distill_losses())}).")
    return _DEFAULT[0]


def loss_options(name: str) -> LossOptions:
    """The options the loss registered as ``name`` takes: ``loss_options('cwd').defaults`` is
    ``{'student_channels': (), 'teacher_channels': (), 'tau': 4.0, 'weight': 3.0, 'connector': 'conv1x1'}`` and
    ``loss_options('cwd').options['tau']`` its `LossOption` (float, > 0, 'softmax temperature over positions')."""
    return _DECLARED[get_distill_loss_class(name)]


def check_loss_options(loss: Union[str, Type[DistillLoss]], options: Dict[str, Any]) -> None:
    """Refuse an option ``loss`` (a name or a registered class) does not take, and a value that does not fit its
    declaration (`LossOption.refusal`: a type, NaN or inf, a `Bound`, a choice): a UsageError that carries the
    option (``DKDLoss: beta must be >= 0, got -1.0.``; on the command line ``--dkd-beta``)."""
    cls = get_distill_loss_class(loss) if isinstance(loss, str) else loss
    declared = _DECLARED[cls]
    unknown = [k for k in options if k not in declared.defaults]
    if unknown and not declared.takes_any:
        raise UsageError(f"Distillation loss '{cls.loss_name}' takes no option {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(declared.defaults)}.")
    for key, value in options.items():
        refusal = declared.options[key].refusal(value) if key in declared.options else None
        if refusal:
            raise UsageError(f"{cls.__name__}: {refusal}.", option=key, loss=cls.loss_name)


def create_distill_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as ``name``: ``create_distill_loss('sa', student_channels=[64], teacher_channels=[256])``.

    Raises:
        UsageError: for an unknown name (the message lists the registered ones), an option the loss does not take
            (the message lists those it takes), or a value its declaration refuses (the message names the option).
    """
    return get_distill_loss_class(name)(**kwargs)
