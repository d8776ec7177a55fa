"""The maps the models' heads take, for a loss whose terms run the heads on maps (`DistillLoss.uses_final_pair`):
which stage of a model its head takes (`head_map_stage`), and the student/teacher pair of them (`head_map_pair`),
which the task and the ``stages`` command both ask."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.utils.model import unwrap_model

from .model_stages import HEAD_INPUT, StageInfo, list_stages

__all__ = ['head_layout', 'head_map_stage', 'head_map_pair']


def head_layout(model: nn.Module) -> str:
    """The layout of a timm model's maps and of its head's input: ``'NHWC'`` where it says so (``output_fmt``: Swin,
    MambaOut), else ``'NCHW'``."""
    return 'NHWC' if getattr(unwrap_model(model), 'output_fmt', 'NCHW') == 'NHWC' else 'NCHW'


def _head_takes_maps(model: nn.Module, channels: int, layout: str) -> bool:
    """Whether ``model.forward_head`` takes 1x1 maps of ``channels`` channels laid out as ``layout`` to (B, classes).

    1x1, because the terms that need this evaluate the head at one position of a map at a time.
    """
    param = next(model.parameters(), None)
    shape = (2, channels, 1, 1) if layout == 'NCHW' else (2, 1, 1, channels)
    probe = torch.zeros(shape, device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None else None)
    was_training = model.training
    model.eval()  # the probe must not move BatchNorm statistics
    try:
        with torch.no_grad():
            out = model.forward_head(probe)
        return isinstance(out, torch.Tensor) and tuple(out.shape) == (2, model.num_classes)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    finally:
        model.train(was_training)


def head_map_stage(model: nn.Module, img_size: Tuple[int, int]) -> Optional[StageInfo]:
    """The stage whose map a timm model's head takes, for the terms that run the head on maps (SA's class-activation
    maps and teacher-head reuse), or None for a head that takes tokens (ViT, Twins, LeViT).

    The last ``feature_info`` stage when its (B, C, H, W) map is what the head takes (a ResNet's ``layer4``, a
    ConvNeXt's ``stages.3``), else the head's own input, `HEAD_INPUT`, when ``forward_features`` returns a map:
    after a conv that follows the last stage (EfficientNet, GhostNet, RexNet, FastViT) or HRNet's final layer, or
    the channels-last map of Swin and MambaOut (`head_layout`; the taps hand it over as NCHW like every stage). Its
    channels and reduction are measured by one forward of a zero image of ``img_size`` (H, W).
    """
    base = unwrap_model(model)
    layout = head_layout(base)
    stages = list_stages(base)
    # the taps give the last stage's map as NCHW: the head takes it as it is only in an NCHW model
    if stages and layout == 'NCHW' and _head_takes_maps(base, stages[-1].channels, layout):
        return stages[-1]
    param = next(base.parameters(), None)
    probe = torch.zeros(1, int(getattr(base, 'in_chans', 3)), *img_size,
                        device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None else None)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            out = base.forward_features(probe)
    finally:
        base.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return None
    channels, height = (out.shape[1], out.shape[2]) if layout == 'NCHW' else (out.shape[3], out.shape[1])
    if not _head_takes_maps(base, int(channels), layout):
        return None
    return StageInfo(name=HEAD_INPUT, index=None, channels=int(channels), reduction=max(1, round(img_size[0] / height)))


def _model_label(model: nn.Module) -> str:
    """A model's class and, where timm built it, its architecture: ``VisionTransformer 'test_vit'``."""
    base = unwrap_model(model)
    arch = (getattr(base, 'pretrained_cfg', None) or {}).get('architecture')
    return f"{type(base).__name__} '{arch}'" if arch else type(base).__name__


def head_map_pair(
        student: nn.Module,
        teacher: nn.Module,
        img_size: Tuple[int, int],
) -> Tuple[Optional[Tuple[StageInfo, StageInfo]], str]:
    """(student stage, teacher stage) whose maps the two heads take (`head_map_stage`), or None and why not, as a
    phrase naming the models whose heads take tokens. The task and the ``stages`` command both ask it."""
    stages = {'student': head_map_stage(student, img_size), 'teacher': head_map_stage(teacher, img_size)}
    tokens = {role: model for role, model in (('student', student), ('teacher', teacher)) if stages[role] is None}
    if not tokens:
        return (stages['student'], stages['teacher']), ''
    named = ' and '.join(f"the {role}'s head ({_model_label(model)})" for role, model in tokens.items())
    return None, f"{named} {'take' if len(tokens) > 1 else 'takes'} no (B, C, H, W) feature map (a token head)"
