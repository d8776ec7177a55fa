"""The teacher of a distillation task: what a teacher name names and whether it can get weights
(`check_teacher_weights`), building and loading it as a frozen `timm.task.DistillationTeacher` (`resolve_teacher`),
and the input it takes beside the student (`check_input_channels`)."""
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import create_model
from timm.task import DistillationTeacher
from timm.utils.model import unwrap_model

from .._checkpoint_checks import check_checkpoint_readable, state_dict_mismatch
from ..errors import UsageError
from ..features import input_size_kwargs, resolve_img_size
from ..model_folder import ModelName, check_pretrained_available, resolve_model_name
from .teacher_classes import teacher_num_classes

__all__ = ['check_teacher_weights', 'resolve_teacher', 'check_input_channels']


def check_teacher_weights(
        teacher: str,
        pretrained_path: Optional[str],
        pretrained: bool,
        path_option: str = 'teacher_pretrained_path=<checkpoint>',
        hub_option: str = 'teacher_pretrained=True',
        name_option: str = 'teacher_model',
) -> ModelName:
    """What teacher name ``teacher`` names (`resolve_model_name`), refused when it cannot get weights: its checkpoint
    must be a readable file (`CheckpointReadError`, a UsageError); without one, only leave to download
    (``pretrained``) will do, and with the Hub off only weights in the local cache. A ``local-dir:<folder>`` (or
    cached ``hf-hub:``) teacher brings its own weights, and its config.json rides along in the result.

    ``path_option``, ``hub_option`` and ``name_option`` name the options in the caller's words: the command line
    checks its flags before anything is built and says ``--teacher-checkpoint FILE``, ``--teacher-pretrained`` and
    ``--teacher``.
    """
    source = resolve_model_name(teacher, name_option, allow_download=pretrained, download_option=hub_option)
    if source.has_weights:
        if pretrained_path:
            raise UsageError(f"Teacher '{teacher}' loads its weights from its folder; drop {path_option}.")
    elif pretrained_path:  # a missing file, a folder, a truncated file: each with its own message
        check_checkpoint_readable(pretrained_path, 'Teacher checkpoint')
    elif not pretrained:
        raise UsageError(f"Teacher '{teacher}' has no weights: pass {path_option} (safetensors or timm .pth), or "
                         f"{hub_option} to download them from the hub.")
    elif ':' not in teacher:  # a registry name: its published weights
        check_pretrained_available(teacher, hub_option)
    return source


def resolve_teacher(
        teacher: Union[str, nn.Module, DistillationTeacher],
        student: nn.Module,
        pretrained_path: Optional[str] = None,
        pretrained: bool = False,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        own_classes: bool = False,
) -> DistillationTeacher:
    """A frozen `DistillationTeacher` from a model name, a module or a teacher.

    A name loads its weights from ``pretrained_path`` (safetensors or a timm checkpoint), a ``local-dir:<folder>``
    name from its folder (config.json and weights, as `timm_sadistill.model_folder` writes them); only
    ``pretrained=True`` lets timm fetch them from the hub. The number of classes follows the student, or with
    ``own_classes`` (a teacher distilled on some of its classes) that of its weights (`teacher_num_classes`); the input
    channels follow the student, and a fixed-size model (ViT, Swin) is built for ``img_size`` (default: the student's
    input size).
    """
    given = teacher.model if isinstance(teacher, DistillationTeacher) else teacher
    if isinstance(given, nn.Module) and unwrap_model(given) is unwrap_model(student):
        raise UsageError("The teacher is the student itself, and freezing the teacher would freeze the student; "
                         "pass another model as the teacher (e.g. a trained copy: copy.deepcopy(student)).")
    if isinstance(teacher, DistillationTeacher):
        resolved = teacher
    elif isinstance(teacher, str):
        source = check_teacher_weights(teacher, pretrained_path, pretrained)
        base = unwrap_model(student)
        folder_classes = source.num_classes
        # None: the architecture's default, that of its published weights
        num_classes = teacher_num_classes(source, pretrained_path, pretrained) if own_classes else base.num_classes
        if folder_classes is not None and folder_classes != num_classes:
            raise UsageError(f"Teacher '{teacher}' has {folder_classes} classes and the student {base.num_classes}; "
                             f"create the student with {{option:{folder_classes}}}, or pass {{option.teacher_classes}} "
                             "(the teacher's class of each student class) to distil on some of its classes.",
                             option='num_classes')
        # DistillationTeacher(name) as timm builds it, plus the input size that a fixed-size model needs
        overlay = {**({'file': pretrained_path} if pretrained_path else {}),
                   **({'num_classes': num_classes} if pretrained_path and num_classes is not None else {}),
                   **(pretrained_cfg_overlay or {})}
        try:
            model = create_model(
                source.load_name, pretrained=True, pretrained_cfg_overlay=overlay or None,
                **({'num_classes': num_classes} if num_classes is not None else {}),
                in_chans=getattr(base, 'in_chans', 3), device=device, dtype=dtype,
                **input_size_kwargs(source.architecture, resolve_img_size(img_size, base)),
            )
        except RuntimeError as e:
            if source.has_weights:
                raise UsageError(
                    f"The weights of '{teacher}' do not fit the architecture its config.json names; export the "
                    f"folder again. Details: {state_dict_mismatch(e)}"
                ) from e
            if not pretrained_path:
                raise
            raise UsageError(
                f"Teacher checkpoint '{pretrained_path}' does not fit '{teacher}' with {num_classes or 'its default'} classes; "
                f"check --teacher / the student's {{option}}. Details: {state_dict_mismatch(e)}", option='num_classes',
            ) from e
        resolved = DistillationTeacher(model, device=device, dtype=dtype)
    elif isinstance(teacher, nn.Module):
        resolved = DistillationTeacher(teacher, device=device, dtype=dtype)
        resolved.model.to(device=device, dtype=dtype)  # timm moves only a teacher it builds by name
    else:
        raise UsageError(f"teacher must be a model name, an nn.Module or a DistillationTeacher, got {type(teacher).__name__}.")
    resolved.eval()
    resolved.requires_grad_(False)
    return resolved


def _input_channels(model: nn.Module) -> Optional[int]:
    """Input channels of a timm model: its ``in_chans``, else those of the conv its ``pretrained_cfg`` names first."""
    base = unwrap_model(model)
    if hasattr(base, 'in_chans'):
        return int(base.in_chans)
    first = (getattr(base, 'pretrained_cfg', None) or {}).get('first_conv')
    first = first[0] if isinstance(first, (list, tuple)) else first
    return getattr(dict(base.named_modules()).get(first or ''), 'in_channels', None)


def check_input_channels(
        student: nn.Module,
        teacher: DistillationTeacher,
        student_mean: torch.Tensor,
        student_std: torch.Tensor,
) -> int:
    """The input channels C both models take; refuses models of different C, and a renormalisation for the teacher
    (student mean/std -> teacher mean/std, (1, C, 1, 1) each) that the channels cannot take (timm keeps 3-entry
    ImageNet statistics in the cfg of a 1-channel model)."""
    s_chans = _input_channels(student) or student_mean.shape[1]
    t_chans = _input_channels(teacher.model) or s_chans
    if s_chans != t_chans:
        raise UsageError(
            f"The student takes {s_chans}-channel inputs and the teacher {t_chans}-channel inputs; build both with "
            f"the same {{option}}.", option='in_chans',
        )
    same_stats = torch.equal(student_mean, teacher.mean_kd) and torch.equal(student_std, teacher.std_kd)
    sizes = {student_mean.shape[1], student_std.shape[1], teacher.mean_kd.shape[1], teacher.std_kd.shape[1]}
    if not same_stats and sizes != {s_chans}:
        raise UsageError(
            f"The models take {s_chans}-channel inputs, but the teacher's input is renormalised from the student's "
            f"mean/std to its own and their pretrained_cfg statistics have {sorted(sizes)} entries; give both models "
            f"{s_chans}-entry statistics: timm.create_model(..., pretrained_cfg_overlay=dict(mean=..., std=...))."
        )
    return s_chans
