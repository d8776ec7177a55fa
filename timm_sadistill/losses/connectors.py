"""Connectors: small trainable projections of student features into the teacher's channel space.

Each is built from (in_channels, out_channels) and dropped after training. Spatial sizes are aligned after
the connector by `align_spatial` (docs/method.md#alignment).
"""
from typing import Callable, Dict, List, Literal, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError

__all__ = ['create_connector', 'list_connectors', 'align_spatial', 'ConnectorList', 'ConnectorName']


def _bottleneck(in_channels: int, out_channels: int) -> nn.Module:
    """1x1 Cs->m, BN, ReLU, 3x3 m->m, BN, ReLU, 1x1 m->Ct, BN with m = Ct // 2 (docs/method.md#connector)."""
    mid = max(1, out_channels // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
    )


def _conv1x1(in_channels: int, out_channels: int) -> nn.Module:
    """1x1 conv + BN."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def _regressor(in_channels: int, out_channels: int) -> nn.Module:
    """3x3 conv + BN + ReLU: the FitNet hint regressor as in the reference implementations."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


def _identity(in_channels: int, out_channels: int) -> nn.Module:
    if in_channels != out_channels:
        raise UsageError(
            f"The 'identity' connector needs equal channels, got student {in_channels} and teacher {out_channels}; "
            "use 'conv1x1' or 'bottleneck'."
        )
    return nn.Identity()


_CONNECTORS: Dict[str, Callable[[int, int], nn.Module]] = {
    'bottleneck': _bottleneck,
    'conv1x1': _conv1x1,
    'regressor': _regressor,
    'identity': _identity,
}


def list_connectors() -> List[str]:
    return sorted(_CONNECTORS)


# the type of a loss's ``connector`` option: its choices are the connectors above
ConnectorName = Literal[tuple(list_connectors())]


def create_connector(kind: str, in_channels: int, out_channels: int) -> nn.Module:
    """A connector of ``kind`` ('bottleneck', 'conv1x1', 'regressor' or 'identity') from Cs to Ct channels."""
    if kind not in _CONNECTORS:
        raise UsageError(f"Unknown connector '{kind}'; use one of {', '.join(list_connectors())}.")
    return _CONNECTORS[kind](in_channels, out_channels)


def align_spatial(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size``: adaptive average pooling down, bilinear interpolation up."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class ConnectorList(nn.ModuleList):
    """One connector per stage pair; ``project(k, s, t)`` maps student features to the teacher's shape."""

    def __init__(self, kind: str, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__([create_connector(kind, cs, ct) for cs, ct in zip(student_channels, teacher_channels)])

    def project(self, index: int, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        """(B, Cs, Hs, Ws) -> (B, Ct, Ht, Wt)."""
        return align_spatial(self[index](student_feat), teacher_feat.shape[-2:])

    def pairs(
            self,
            student_feats: Sequence[torch.Tensor],
            teacher_feats: Sequence[torch.Tensor],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """[(projected student, teacher)] per stage pair, each pair of shape (B, Ct_k, Ht_k, Wt_k)."""
        return [(self.project(k, s, t), t) for k, (s, t) in enumerate(zip(student_feats, teacher_feats))]
