"""The ``name[option=value,...]`` method specs of the benchmarks (`parse_loss_spec`), read with the declared option
types."""
from typing import Any, Callable, Dict, List, Tuple, Union

from ..errors import UsageError
from ._loss_options import LossOption
from ._registry import loss_options

__all__ = ['parse_loss_spec', 'SPEC_TASK_KEYWORDS']


def _spec_stages(text: str) -> Union[int, str, List[Union[int, str]]]:
    """'-2' -> -2, 'layer3' -> 'layer3', '-2|-1' -> [-2, -1] (a spec's commas separate its options)."""
    def one(item: str) -> Union[int, str]:
        return int(item) if item.lstrip('-').isdigit() else item
    return [one(item) for item in text.split('|')] if '|' in text else one(text)


def _spec_bool(text: str) -> bool:
    if text not in ('true', 'false'):
        raise UsageError(f"expected true or false, got '{text}'.")
    return text == 'true'


# keywords of a spec that go to the task (`DistillTask`), not the loss, each with its reader
SPEC_TASK_KEYWORDS: Dict[str, Callable[[str], Any]] = {
    'distill_loss_weight': float,
    'task_loss_weight': float,
    'temperature': float,
    'student_stages': _spec_stages,
    'teacher_stages': _spec_stages,
    'teacher_amp_dtype': str,
    'compile_teacher': _spec_bool,
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
    ``temperature`` (floats), the stages, ``teacher_stages=-2`` (one) or ``teacher_stages=-4|-3`` (a list), and how
    the teacher runs, ``teacher_amp_dtype=bfloat16`` and ``compile_teacher=true``.
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
