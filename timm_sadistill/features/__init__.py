"""Features of timm models for distillation: a model's stages, their taps, the ``auto`` pairing rule, the maps the
heads take, input sizes."""
from .input_size import check_input_size, default_img_size, input_size_kwargs, resolve_img_size
from .model_stages import (
    AUTO_MIN_MAP, AUTO_MIN_REDUCTION, HEAD_INPUT, StageInfo, StagesArg, auto_stages, list_stages, resolve_stages,
)
from .head_maps import head_layout, head_map_pair, head_map_stage
from .stage_pairing import pair_stages
from .taps import FeatureTaps, stage_map_sizes

__all__ = [
    'StageInfo', 'StagesArg', 'FeatureTaps', 'list_stages', 'resolve_stages', 'stage_map_sizes', 'pair_stages', 'auto_stages',
    'default_img_size', 'resolve_img_size', 'input_size_kwargs', 'check_input_size', 'AUTO_MIN_MAP',
    'AUTO_MIN_REDUCTION', 'HEAD_INPUT', 'head_layout', 'head_map_stage', 'head_map_pair',
]
