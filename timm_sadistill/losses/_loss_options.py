"""How a loss declares its options, and the one reader of that declaration (`read_options`).

An option is a keyword parameter of the loss's constructor (every one but the keywords a task fills in,
`timm_sadistill.losses.base.TASK_FILLED`), with a type annotation, a default and a one-line help, its entry in the
Google-style ``Args:`` section of the ``__init__`` or class docstring. Types are ``float``, ``int``, ``bool``, ``str``
or ``Literal[...]`` of strings (a choice), optionally inside ``Annotated[..., Positive]`` (temperatures, powers),
``Annotated[..., NonNegative]`` (the weight of a term, a count) or ``Annotated[str, HowNotWhat]`` (how the loss is
computed, not what: a kernel backend). `LossOption.problem` is the one check of a value against its declaration.
"""
import inspect
import math
import numbers
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

from ..errors import UsageError
from .base import TASK_FILLED, DistillLoss

__all__ = ['Bound', 'Positive', 'NonNegative', 'HowNotWhat', 'LossOption', 'LossOptions', 'REQUIRED', 'read_options']

REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none
_OPTION_TYPES = (float, int, bool, str)


@dataclass(frozen=True)
class Bound:
    """A lower bound of a numeric option, declared as ``Annotated[float, Positive]``: ``value > minimum`` when
    ``strict``, else ``value >= minimum``."""
    minimum: float
    strict: bool

    def __str__(self) -> str:
        return f"{'>' if self.strict else '>='} {self.minimum:g}"

    def holds(self, value: float) -> bool:
        return value > self.minimum if self.strict else value >= self.minimum


Positive = Bound(0, strict=True)  # temperatures, powers
NonNegative = Bound(0, strict=False)  # the weight of a term (0 turns it off), a count of steps


class _HowNotWhat:
    """The marker of an option that picks how the loss is computed, not its value (a kernel backend), declared as
    ``Annotated[str, HowNotWhat]``: ``--resume`` may change it."""

    def __repr__(self) -> str:
        return 'HowNotWhat'


HowNotWhat = _HowNotWhat()


@dataclass(frozen=True)
class LossOption:
    """One option of a loss, as its constructor declares it.

    type: ``float``, ``int``, ``bool`` or ``str``; choices: the allowed strings of a ``Literal`` (else empty);
    bound: the `Bound` of an ``Annotated`` numeric option (else None); help: its ``Args:`` entry, without the
    final full stop; changes_loss: False for an option marked `HowNotWhat` (it changes how, not what).
    """
    name: str
    type: type
    default: Any
    help: str
    choices: Tuple[str, ...] = ()
    bound: Optional[Bound] = None
    changes_loss: bool = True

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with ``value`` for this option, worded to follow its name (``'must be >= 0, got -1.0'``,
        ``"must be one of kd, dist, got 'kl'"``), or None when it fits: the one check of an option's value, which
        construction, the factories and the command line's flags all ask."""
        if self.type is bool:
            fits = isinstance(value, bool)
        elif self.type is str:
            fits = isinstance(value, str)
        else:
            number = numbers.Integral if self.type is int else numbers.Real
            fits = isinstance(value, number) and not isinstance(value, bool)
        if not fits:
            return f"must be {'an' if self.type is int else 'a'} {self.type.__name__}, got {value!r}"
        if self.type is float and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.bound is not None and not self.bound.holds(value):
            return f"must be {self.bound}, got {value}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        return None

    def refusal(self, value: Any) -> Optional[str]:
        """The sentence that refuses ``value`` (no full stop), naming the option where ``{option}`` stands (a
        `UsageError` template: the command line puts the flag there), or None when it fits: ``"{option} must be >=
        0, got -1.0"``, ``"Unknown {option} 'kl'; use one of kd, dist"``."""
        problem = self.problem(value)
        if problem is None:
            return None
        if self.choices and isinstance(value, str):
            return f"Unknown {{option}} '{value}'; use one of {', '.join(self.choices)}"
        return f"{{option}} {problem}"


@dataclass(frozen=True)
class LossOptions:
    """The keyword parameters a registered loss's constructor takes.

    defaults: parameter -> default, in the constructor's order, the parameters a task fills in (`TASK_FILLED`)
        included.
    options: the declared options (every parameter but those a task fills in), name -> `LossOption`.
    takes_any: the constructor also takes ``**kwargs``, so options beyond ``defaults`` pass through to it.
    """
    defaults: Dict[str, Any]
    options: Dict[str, LossOption]
    takes_any: bool


def _docstring_args(*docs: Optional[str]) -> Dict[str, str]:
    """{name: help} from the Google-style ``Args:`` sections of ``docs``; an entry ``a, b: text`` documents both, and
    its continuation lines (indented deeper) join its help."""
    helps: Dict[str, str] = {}
    for doc in docs:
        lines = (doc or '').expandtabs().splitlines()  # not cleandoc: 'Args:' may be the docstring's first line
        starts = [i for i, line in enumerate(lines) if line.strip() == 'Args:']
        if not starts:
            continue
        section = lines[starts[0]].index('A')
        entry_indent, names = None, []
        for line in lines[starts[0] + 1:]:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= section:
                break
            if entry_indent is None:
                entry_indent = indent
            if indent == entry_indent and ':' in line:
                head, text = line.strip().split(':', 1)
                names = [n.strip().split(' ')[0].lstrip('*') for n in head.split(',')]
                for name in names:
                    helps.setdefault(name, text.strip())
            elif indent > entry_indent:
                for name in names:
                    helps[name] = f'{helps[name]} {line.strip()}'.strip()
    return helps


def _option_kind(annotation: Any) -> Tuple[Optional[type], Tuple[str, ...], Optional[Bound], bool]:
    """(type, choices, bound, changes_loss) of an option's annotation; type None when it is not one an option may
    have."""
    bound, changes_loss = None, True
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        bounds = [x for x in extras if isinstance(x, Bound)]
        bound = bounds[0] if bounds else None
        changes_loss = not any(x is HowNotWhat for x in extras)
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        if choices and all(isinstance(c, str) for c in choices):
            return str, tuple(choices), bound, changes_loss
        return None, (), bound, changes_loss
    return (annotation if annotation in _OPTION_TYPES else None), (), bound, changes_loss


def read_options(cls: Type[DistillLoss]) -> LossOptions:
    """The `LossOptions` of a loss class, or UsageError saying what its declaration lacks (`register_distill_loss`
    reads each class once)."""
    init = cls.__init__
    parameters = list(inspect.signature(init).parameters.values())[1:]  # not self
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception as e:  # a forward reference that does not resolve
        raise UsageError(f"{cls.__qualname__}.__init__'s annotations do not resolve ({e}); annotate its options "
                         "with float, int, bool, str or Literal[...].") from e
    docs_stripped = sys.flags.optimize >= 2  # python -OO: there is no help text to read
    helps = _docstring_args(getattr(init, '__doc__', None), cls.__doc__)
    where = f"{cls.__module__}.{cls.__qualname__}"
    options: Dict[str, LossOption] = {}
    for p in parameters:
        if p.kind not in named or p.name in TASK_FILLED:
            continue
        kind, choices, bound, changes_loss = _option_kind(hints.get(p.name, REQUIRED))
        if kind is None:
            raise UsageError(
                f"{where}: option '{p.name}' needs a type annotation: float, int, bool, str or Literal['a', 'b'], "
                f"optionally Annotated[float, Positive] or Annotated[float, NonNegative] (got {hints.get(p.name, 'none')})."
            )
        if p.default is REQUIRED:
            raise UsageError(f"{where}: option '{p.name}' needs a default (the value a run takes without its flag).")
        if p.name not in helps and not docs_stripped:
            raise UsageError(f"{where}: option '{p.name}' needs a help line: an entry '{p.name}: what it does' in "
                             "the Args: section of the class or __init__ docstring.")
        help = helps.get(p.name, '')
        option = LossOption(p.name, kind, p.default, help[:-1] if help.endswith('.') else help, choices, bound,
                            changes_loss)
        wrong = option.problem(p.default)
        if wrong:
            raise UsageError(f"{where}: the default of option '{p.name}' {wrong}.")
        options[p.name] = option
    return LossOptions(
        defaults={p.name: p.default for p in parameters if p.kind in named},
        options=options,
        takes_any=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters),
    )
