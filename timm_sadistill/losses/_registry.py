"""Registry of distillation losses, in the manner of timm's model registry.

A loss's options are declared once, in its constructor: every keyword parameter but the ones a task fills in
(`TASK_FILLED`: ``student_channels``, ``teacher_channels`` and, for a loss that takes the heads' maps, ``head_maps``)
is an option, with a type annotation, a default and a one-line help, its entry in the
Google-style ``Args:`` section of the ``__init__`` or class docstring::

    @register_distill_loss('sp')
    class SPLoss(DistillLoss):
        '''...

        Args:
            weight: weight of the similarity term.
            mode: which Gram matrix to compare.
        '''
        def __init__(self, student_channels=(), teacher_channels=(),
                     weight: Annotated[float, NonNegative] = 3000.0, mode: Literal['batch', 'channel'] = 'batch'):

Types are ``float``, ``int``, ``bool``, ``str`` or ``Literal[...]`` of strings (a choice), optionally inside
``Annotated[..., Positive]`` (temperatures, powers) or ``Annotated[..., NonNegative]`` (the weight of a term, a
count). To add an option: add a typed, defaulted, documented constructor parameter; nothing else. Everything else
derives from it (`loss_options` is the one reader): the factories' checks (NaN, inf, a bound, a type, named in the
message), the command line's ``--<loss>-<option>`` flags of ``train``, ``timm-train`` and ``viz`` (``_`` written
``-``; a ``temperature`` is timm's ``--kd-temperature``), the options a run records in args.yaml and its model card,
and what ``--resume`` compares. `register_distill_loss` refuses, when the class is defined, an option without a type,
a default or a help line.

A package of your own makes its losses known to the command line by an entry point in the group
``timm_sadistill.losses`` naming the module that registers them (pyproject.toml)::

    [project.entry-points."timm_sadistill.losses"]
    sp = "my_package.sp_loss"

The parsers import every such module (`load_loss_plugins`) before they are built, so ``--distill sp`` and
``--sp-weight`` exist with no edit of ours. In Python, importing the module is enough.

`parse_loss_spec` reads the ``name[option=value,...]`` method specs of the benchmarks with the declared types.
"""
import inspect
import math
import numbers
import sys
import typing
from dataclasses import dataclass
from functools import wraps
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union

from ..errors import UsageError
from .base import DistillLoss

__all__ = [
    'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class',
    'loss_options', 'LossOptions', 'LossOption', 'Bound', 'Positive', 'NonNegative', 'HowNotWhat', 'REQUIRED',
    'check_loss_options', 'load_loss_plugins', 'parse_loss_spec', 'PLUGIN_GROUP', 'SPEC_TASK_KEYWORDS',
]

_LOSSES: Dict[str, Type[DistillLoss]] = {}
_DECLARED: Dict[type, 'LossOptions'] = {}  # each registered class's options, read once when it registers
LossClass = TypeVar('LossClass', bound=Type[DistillLoss])

REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none
# the task fills these in from its taps, so they are not options: no flag, not recorded, not compared on resume
TASK_FILLED = ('student_channels', 'teacher_channels', 'head_maps')
PLUGIN_GROUP = 'timm_sadistill.losses'
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
        """What is wrong with ``value`` for this option, worded to follow its name (``'must be >= 0, got -1.0'``),
        or None when it fits. The choices are left to the constructor, which names them in its own words."""
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
        return None


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


def _read_options(cls: Type[DistillLoss]) -> LossOptions:
    """The `LossOptions` of a loss class, or UsageError saying what its declaration lacks."""
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
        wrong = option.problem(p.default) or (
            f"must be one of {', '.join(choices)}, got {p.default!r}" if choices and p.default not in choices else None)
        if wrong:
            raise UsageError(f"{where}: the default of option '{p.name}' {wrong}.")
        options[p.name] = option
    return LossOptions(
        defaults={p.name: p.default for p in parameters if p.kind in named},
        options=options,
        takes_any=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters),
    )


def _checking_init(cls: Type[DistillLoss], declared: LossOptions) -> Callable:
    """``cls.__init__`` that checks its declared options first and records them (defaults included) as
    ``loss.option_values``, so that direct construction is checked like the factories."""
    init = cls.__init__
    signature = inspect.signature(init)

    @wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {name: bound.arguments[name] for name in declared.options}
        check_loss_options(cls, values)
        init(self, *args, **kwargs)
        self.option_values = values

    return __init__


def register_distill_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator that makes a `DistillLoss` subclass available as ``create_distill_loss(name)``.

    Reads the class's options (see the module docstring) and refuses a declaration that lacks a type, a default or
    a help line; construction then checks each option's value against its declaration.

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
        declared = _read_options(cls)
        cls.__init__ = _checking_init(cls, declared)
        _DECLARED[cls] = declared
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
    """The options the loss registered as ``name`` takes: ``loss_options('cwd').defaults`` is
    ``{'student_channels': (), 'teacher_channels': (), 'tau': 4.0, 'weight': 3.0, 'connector': 'conv1x1'}`` and
    ``loss_options('cwd').options['tau']`` its `LossOption` (float, > 0, 'softmax temperature over positions')."""
    return _DECLARED[get_distill_loss_class(name)]


def check_loss_options(loss: Union[str, Type[DistillLoss]], options: Dict[str, Any]) -> None:
    """Refuse an option ``loss`` (a name or a registered class) does not take, and a value that does not fit its
    declaration (a type, NaN or inf, a `Bound`), naming the option: UsageError."""
    cls = get_distill_loss_class(loss) if isinstance(loss, str) else loss
    declared = _DECLARED[cls]
    unknown = [k for k in options if k not in declared.defaults]
    if unknown and not declared.takes_any:
        raise UsageError(f"Distillation loss '{cls.loss_name}' takes no option {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(declared.defaults)}.")
    for key, value in options.items():
        problem = declared.options[key].problem(value) if key in declared.options else None
        if problem:
            raise UsageError(f"{cls.__name__}: {key} {problem}.")


def create_distill_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as ``name``: ``create_distill_loss('sa', student_channels=[64], teacher_channels=[256])``.

    Raises:
        UsageError: for an unknown name (the message lists the registered ones), an option the loss does not take
            (the message lists those it takes), or a value its declaration refuses (the message names the option).
    """
    check_loss_options(name, kwargs)
    return get_distill_loss_class(name)(**kwargs)


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


def _spec_stages(text: str) -> Union[int, str, List[Union[int, str]]]:
    """'-2' -> -2, 'layer3' -> 'layer3', '-2|-1' -> [-2, -1] (a spec's commas separate its options)."""
    def one(item: str) -> Union[int, str]:
        return int(item) if item.lstrip('-').isdigit() else item
    return [one(item) for item in text.split('|')] if '|' in text else one(text)


# keywords of a spec that go to the task (`DistillTask`), not the loss, each with its reader
SPEC_TASK_KEYWORDS: Dict[str, Callable[[str], Any]] = {
    'distill_loss_weight': float,
    'task_loss_weight': float,
    'temperature': float,
    'student_stages': _spec_stages,
    'teacher_stages': _spec_stages,
}


def _spec_value(option: LossOption, text: str) -> Any:
    if option.type is bool:
        if text not in ('true', 'false'):
            raise UsageError(f"option {option.name}={text}: write true or false.")
        return text == 'true'
    try:
        return option.type(text)
    except ValueError:
        raise UsageError(f"option {option.name}={text}: expected {option.type.__name__}.") from None


def parse_loss_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """A method spec of the benchmarks, ``name[option=value,...]``, as (name, options) converted by the declared
    option types: ``'sa[cam_weight=1,standardize=true]'`` -> ``('sa', {'cam_weight': 1.0, 'standardize': True})``.

    The task's own keywords are read too (`SPEC_TASK_KEYWORDS`): ``distill_loss_weight``, ``task_loss_weight``,
    ``temperature`` (floats) and the stages, ``teacher_stages=-2`` (one) or ``teacher_stages=-4|-3`` (a list).
    A name without options (``'sa'``, ``'none'``) gives ``{}``; an option a registered loss does not declare is a
    UsageError naming it.
    """
    name, bracket, rest = spec.partition('[')
    if bracket and not rest.endswith(']'):
        raise UsageError(f"Method spec '{spec}' lacks its closing ']'; write e.g. sa[beta=30,connector=conv1x1].")
    items = [item for item in rest[:-1].split(',') if item] if bracket else []
    if not items:
        return name, {}
    declared = loss_options(name)
    options: Dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition('=')
        if not equals:
            raise UsageError(f"Method spec '{spec}': '{item}' is not option=value.")
        if key in declared.options:
            options[key] = _spec_value(declared.options[key], text)
        elif key in SPEC_TASK_KEYWORDS:
            options[key] = SPEC_TASK_KEYWORDS[key](text)
        else:
            raise UsageError(f"Method spec '{spec}': '{name}' has no option '{key}'; it has "
                             f"{', '.join([*declared.options, *SPEC_TASK_KEYWORDS])}.")
    return name, options
