"""Plain PyTorch reference of the ops: each formula here declares an op of `timm_sadistill.ops` (its name, its
arguments and their bounds: tensors annotated ``torch.Tensor``, ``Annotated[float, Positive]`` scalars > 0).

These are the CPU fallback and the ground truth the Triton kernels are tested against. All math is in
float32 (float64 inputs stay float64, for gradcheck) whatever the input dtype, so fp16/bf16 features
with large activations give no inf or NaN.

Shapes: s (student, after its connector) and t (teacher) are (B, C, H, W) with equal shapes.
"""
from typing import Annotated, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .op_registry import Positive

__all__ = ['spatial_attention', 'spatial_kl', 'spatial_kl_and_attention']


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def spatial_attention(x: torch.Tensor, p: Annotated[float, Positive] = 2.0) -> torch.Tensor:
    """a_b(i) = mean_c |x_{b,c,i}|^p, L2-normalised over the H*W positions i.

    Args:
        x: (B, C, H, W) features.
        p: power applied to |x| before the channel mean.

    Returns:
        (B, H*W) attention maps of unit L2 norm (float32, float64 for float64 input).
    """
    a = rearrange(_upcast(x).abs().pow(p).mean(dim=1), 'b h w -> b (h w)')
    return F.normalize(a, p=2.0, dim=1)


def spatial_kl(s: torch.Tensor, t: torch.Tensor, tau: Annotated[float, Positive] = 4.0) -> torch.Tensor:
    """Channel-wise spatial softmax KL (CWD, Shu et al. 2021; SA's L_dist).

    P^X_{b,c} = softmax_i(X_{b,c,i} / tau) over the H*W positions i;
    L = tau^2 / (B*C) * sum_{b,c} KL(P^T_{b,c} || P^S_{b,c}).

    Args:
        s: (B, C, H, W) student features (after the connector).
        t: (B, C, H, W) teacher features.
        tau: softmax temperature.

    Returns:
        Scalar loss.
    """
    rows_s = rearrange(_upcast(s), 'b c h w -> (b c) (h w)') / tau
    rows_t = rearrange(_upcast(t), 'b c h w -> (b c) (h w)') / tau
    log_p_s = F.log_softmax(rows_s, dim=1)
    log_p_t = F.log_softmax(rows_t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (tau ** 2) / rows_s.shape[0]


def spatial_kl_and_attention(s: torch.Tensor, t: torch.Tensor, tau: Annotated[float, Positive] = 4.0,
                             p: Annotated[float, Positive] = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two unweighted SA terms (docs/method.md#the-sa-loss).

    L_dist = spatial_kl(s, t, tau); L_att = 1/B * sum_b ||a^S_b - a^T_b||_2^2 with a = spatial_attention(., p).

    Returns:
        (L_dist, L_att), two scalars.
    """
    att = (spatial_attention(s, p) - spatial_attention(t, p)).pow(2).sum(dim=1).mean()
    return spatial_kl(s, t, tau), att

