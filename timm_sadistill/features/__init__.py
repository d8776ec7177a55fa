"""Features of timm models for distillation: stage taps, the ``auto`` pairing rule, input sizes."""
from .input_size import check_input_size, default_img_size, input_size_kwargs, resolve_img_size
from .stage_pairing import AUTO_MIN_MAP, AUTO_MIN_REDUCTION, auto_stages, pair_stages
from .taps import (
    HEAD_INPUT, FeatureTaps, StageInfo, StagesArg, head_layout, head_map_stage, list_stages, resolve_stages,
    stage_map_sizes,
)

__all__ = [
    'StageInfo', 'StagesArg', 'FeatureTaps', 'list_stages', 'resolve_stages', 'stage_map_sizes', 'pair_stages', 'auto_stages',
    'default_img_size', 'resolve_img_size', 'input_size_kwargs', 'check_input_size', 'AUTO_MIN_MAP',
    'AUTO_MIN_REDUCTION', 'HEAD_INPUT', 'head_layout', 'head_map_stage',
]
