"""The teacher's classes that are the data's: a teacher that knows more classes than the data (a pretrained ImageNet
model on folders named by ImageNet synsets, a model folder whose ``label_names`` include the class folders) is
distilled on the data's classes only, its logits restricted to them in the data's order.

`teacher_class_names` says which class each of a teacher's logits is (its ``label_names``, else the ImageNet subset
timm infers from its class count), `match_teacher_classes` finds the data's class names among them,
`resolve_teacher_classes` checks the task's ``teacher_classes`` against a built teacher, and `teacher_num_classes`
reads the class count of a teacher's weights before it is built.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.data import ImageNetInfo, infer_imagenet_subset
from timm.models import get_pretrained_cfg
from timm.utils.model import unwrap_model

from .._checkpoint_checks import load_checkpoint
from ..errors import UsageError
from ..model_folder import ModelName

__all__ = [
    'ClassNames', 'teacher_class_names', 'match_teacher_classes', 'resolve_teacher_classes', 'teacher_num_classes',
    'describe_mapping', 'preview_names',
]


@dataclass(frozen=True)
class ClassNames:
    """The classes of a model's logits: ``names[k]`` is class k's unique name (a synset for ImageNet); ``source``
    says where the names come from, in a phrase; ``imagenet_subset`` is timm's subset name when they are ImageNet's,
    whose descriptions then match too."""
    names: Tuple[str, ...]
    source: str
    imagenet_subset: Optional[str] = None


def preview_names(names: Sequence[str], limit: int = 4) -> str:
    """'a, b, c, d, ... (12)': the first ``limit`` names and, past them, how many there are."""
    return ', '.join(names[:limit]) + (f', ... ({len(names)})' if len(names) > limit else '')


def teacher_class_names(label_names: Optional[Sequence[str]], num_classes: Optional[int]) -> Optional[ClassNames]:
    """The names of a teacher's ``num_classes`` logits: its ``label_names`` (a model folder's or Hub config.json, the
    ``pretrained_cfg`` of a model built from one), else the synsets of the ImageNet subset timm infers from the class
    count (`timm.data.infer_imagenet_subset`: 1000 -> ImageNet-1k, 21841 -> ImageNet-22k, ...); None when neither."""
    subset = infer_imagenet_subset({'num_classes': num_classes}) if num_classes else None
    synsets = tuple(ImageNetInfo(subset).label_names()) if subset else None
    if label_names:
        names = tuple(label_names)
        return ClassNames(names, f'its label_names ({preview_names(names, 3)})',
                          subset if names == synsets else None)
    if synsets is None:
        return None
    return ClassNames(synsets, f'the {subset} synsets and descriptions of timm.data.ImageNetInfo, as timm infers '
                               f'from its {num_classes} classes', subset)


def _normal(name: str) -> str:
    """A class name as descriptions are compared: case and '_' / ' ' aside ('English_springer' is 'english springer')."""
    return name.replace('_', ' ').strip().lower()


def _by_description(subset: str) -> Dict[str, List[int]]:
    """The ImageNet classes of each first description name ('tench' of 'tench, Tinca tinca'), normalised; a name of
    several classes ('crane': the bird and the machine) lists them all."""
    info = ImageNetInfo(subset)
    found: Dict[str, List[int]] = {}
    for k in range(info.num_classes()):
        found.setdefault(_normal(info.index_to_description(k).split(',')[0]), []).append(k)
    return found


def match_teacher_classes(classes: Sequence[str], known: ClassNames) -> Tuple[List[int], List[str]]:
    """(the teacher class of each of ``classes`` that it knows, in their order; the names it does not know).

    A name matches a teacher class's name exactly, or, for ImageNet's classes, the first name of its description
    (case and '_' aside: a folder 'tench' is n01440764).

    Raises:
        UsageError: a name that matches several descriptions ('crane'), or two names of one teacher class.
    """
    index = {name: k for k, name in enumerate(known.names)}
    descriptions = _by_description(known.imagenet_subset) if known.imagenet_subset else {}
    found: Dict[int, str] = {}  # teacher class -> the name that matched it, in the order of ``classes``
    unknown, ambiguous = [], []
    for name in classes:
        matches = [index[name]] if name in index else descriptions.get(_normal(name), [])
        if len(matches) > 1:
            ambiguous.append(f"'{name}' ({' or '.join(known.names[k] for k in matches)})")
        elif not matches:
            unknown.append(name)
        elif matches[0] in found:
            raise UsageError(f"Classes '{found[matches[0]]}' and '{name}' are both the teacher's class {matches[0]} "
                             f"({known.names[matches[0]]}); merge them into one class.")
        else:
            found[matches[0]] = name
    if ambiguous:
        raise UsageError(f"Class name {', '.join(ambiguous[:3])} describes more than one {known.imagenet_subset} "
                         "class; name such classes by their synset (rename the folder, or its --class-map line).")
    return list(found), unknown


def describe_mapping(classes: Sequence[str], indices: Sequence[int], limit: Optional[int] = 4) -> str:
    """'n01440764 -> 0, n02102040 -> 217, ...': each class and its teacher class (the first ``limit``; None: all)."""
    pairs = [f'{name} -> {k}' for name, k in zip(classes, indices)]
    return ', '.join(pairs if limit is None else pairs[:limit]) + (
        f', ... ({len(pairs)})' if limit is not None and len(pairs) > limit else '')


def resolve_teacher_classes(
        teacher_classes: Sequence[Union[int, str]],
        teacher: nn.Module,
        student: nn.Module,
) -> List[int]:
    """The teacher's logit indices of the task's ``teacher_classes``: indices into the teacher's logits, or class
    names it knows (`teacher_class_names` of its ``pretrained_cfg`` label_names and class count; `match_teacher_classes`),
    one per class of the student, in the student's order.

    Raises:
        UsageError: an empty or mixed list, an index out of the teacher's range or given twice, a name the teacher
            does not know, or a count that is not the student's classes; each naming ``teacher_classes``.
    """
    base_t, base_s = unwrap_model(teacher), unwrap_model(student)
    t_count = getattr(base_t, 'num_classes', None)
    values = list(teacher_classes) if not isinstance(teacher_classes, str) else [teacher_classes]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not values or not (ints or all(isinstance(v, str) for v in values)):
        raise UsageError("{option} lists the teacher's class of each student class: all indices into the teacher's "
                         f"logits or all class names, got {str(values)[:80]}.", option='teacher_classes')
    if ints:
        indices = values
        wrong = [k for k in indices if not 0 <= k < (t_count or 0)]
        if wrong:
            raise UsageError(f"{{option}} holds {wrong[0]}, outside 0..{(t_count or 0) - 1} of the teacher's "
                             f"{t_count} classes; pass indices into its logits.", option='teacher_classes')
        if len(set(indices)) < len(indices):
            twice = next(k for k in indices if indices.count(k) > 1)
            raise UsageError(f"{{option}} holds the teacher's class {twice} twice; one student class each.",
                             option='teacher_classes')
    else:
        known = teacher_class_names((getattr(base_t, 'pretrained_cfg', None) or {}).get('label_names'), t_count)
        if known is None:
            raise UsageError(f"{{option}} names classes, but the teacher ({t_count} classes) has no label_names and "
                             "no ImageNet class count; pass indices into its logits.", option='teacher_classes')
        indices, unknown = match_teacher_classes(values, known)
        if unknown:
            raise UsageError(f"{{option}} names classes the teacher does not know ({preview_names(unknown)}; its "
                             f"classes are {known.source}); pass classes it knows, or indices.",
                             option='teacher_classes')
    s_count = getattr(base_s, 'num_classes', None)
    if s_count and len(indices) != s_count:
        raise UsageError(f"{{option}} lists {len(indices)} teacher classes for the student's {s_count}; list one "
                         "per student class, in its order.", option='teacher_classes')
    return [int(k) for k in indices]


def _checkpoint_classes(path: str, architecture: str) -> Optional[int]:
    """The rows of the classifier of ``architecture`` (its pretrained_cfg's ``classifier``) in checkpoint ``path``
    (safetensors, or a timm checkpoint with or without 'state_dict'); None when it has none by that name."""
    cfg = get_pretrained_cfg(architecture)
    classifier = cfg.classifier if cfg is not None else None
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    if not classifier:
        return None
    key = f'{classifier}.weight'
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:  # the header only
            return f.get_slice(key).get_shape()[0] if key in f.keys() else None
    state = load_checkpoint(path, 'Teacher checkpoint')
    if isinstance(state, dict):
        state = next((state[k] for k in ('state_dict', 'model') if isinstance(state.get(k), dict)), state)
        weight = state.get(key, state.get(f'module.{key}'))
        return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None
    return None


def teacher_num_classes(source: ModelName, pretrained_path: Optional[str], pretrained: bool) -> Optional[int]:
    """The class count of the weights a teacher loads, before it is built: its folder's config.json, the classifier
    of its checkpoint ``pretrained_path``, or, with leave to load its published weights (``pretrained``), their
    pretrained_cfg; None when unknown."""
    if source.num_classes is not None:
        return source.num_classes
    if pretrained_path:
        return _checkpoint_classes(pretrained_path, source.architecture)
    if pretrained and not source.has_weights and ':' not in source.name:
        cfg = get_pretrained_cfg(source.name)
        return cfg.num_classes if cfg is not None else None
    return None
