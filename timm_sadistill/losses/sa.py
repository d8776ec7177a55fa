"""SA: spatial-attention-map distillation (Wang & Liu 2024), reconstructed from the abstract: docs/method.md is
its spec (#the-sa-loss for the formulas, #defaults for where each default comes from).

SA's options are declared once, in `SA_OPTIONS`: `SADistillLoss`'s defaults, `SADistillTask`'s keywords and their
documentation, and the command line's ``--sa-*`` flags (``train``, ``timm-train``, ``viz``) all come from it.
To add an option:

1. add a row ``SAOption('gamma', 0.5, float, 'weight of the new term')`` to `SA_OPTIONS` (``flag=False`` keeps it
   off the command line);
2. give `SADistillLoss.__init__` the parameter ``gamma: float = _DEFAULTS['gamma']`` and use it in the loss.

Nothing else changes: ``SADistillTask(..., gamma=...)``, ``create_distill_task('sa', ..., gamma=...)`` and
``--sa-gamma`` follow (tests/test_losses.py checks that the table and the constructor agree).
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import ops
from ._registry import register_distill_loss
from .base import DistillLoss
from .connectors import ConnectorList, list_connectors
from .kd import kd_divergence

__all__ = ['SADistillLoss', 'SAOption', 'SA_OPTIONS', 'document_sa_options']


@dataclass(frozen=True)
class SAOption:
    """One option of SA: a keyword of `SADistillLoss` (and so of `SADistillTask`) and, when ``flag``, the
    command-line flag ``--sa-<name>`` (``_`` written ``-``) of that ``type``, restricted to ``choices`` if any."""
    name: str
    default: Any
    type: Callable[[str], Any]
    help: str
    flag: bool = True
    choices: Tuple[str, ...] = ()


# The defaults are the measured ones: docs/method.md#defaults says where each comes from.
SA_OPTIONS: Tuple[SAOption, ...] = (
    SAOption('tau', 4.0, float, 'spatial softmax temperature'),
    SAOption('p', 2.0, float, 'power of |x| in the attention map'),
    SAOption('alpha', 1.0, float, 'weight of the spatial distribution term'),
    SAOption('beta', 10.0, float, 'weight of the attention-map term'),
    SAOption('kd_weight', 1.0, float, 'weight of the logit KD term (0: off)'),
    # every method's logit temperature has one flag, --kd-temperature
    SAOption('temperature', 4.0, float, 'temperature of the logit KD term', flag=False),
    SAOption('connector', 'bottleneck', str, 'student->teacher connector', choices=tuple(list_connectors())),
    SAOption('backend', 'auto', str, "fused ops: 'auto' (Triton on CUDA), 'triton' or 'torch'", flag=False),
)
_DEFAULTS: Dict[str, Any] = {option.name: option.default for option in SA_OPTIONS}


def document_sa_options(cls: type) -> type:
    """Class decorator: write `SA_OPTIONS`, ``name (default): help`` a line, where ``{sa_options}`` stands in the
    class docstring, so the documented options are the declared ones."""
    if cls.__doc__:  # None under python -OO
        lines = '\n'.join(f'        {o.name} ({o.default!r}): {o.help}'
                          + (f" (one of {', '.join(o.choices)})" if o.choices else '') for o in SA_OPTIONS)
        cls.__doc__ = cls.__doc__.replace('{sa_options}', lines)
    return cls


@register_distill_loss('sa')
@document_sa_options
class SADistillLoss(DistillLoss):
    """SA: per stage pair k, with S'_k = g_k(S_k) the student map through a conv connector, resized to (Ht, Wt):

        L_dist,k = tau^2 / (B*Ct) * sum_{b,c} KL(softmax_i(T_bc / tau) || softmax_i(S'_bc / tau))
        L_att,k  = 1/B * sum_b || a(S')_b - a(T)_b ||_2^2,   a(X)_b = normalize_i(mean_c |X_{b,c,i}|^p)
        SA       = mean_k (alpha * L_dist,k + beta * L_att,k)  (+ kd_weight * KD(logits, temperature))

    Shapes: student features (B, Cs_k, Hs_k, Ws_k), teacher features (B, Ct_k, Ht_k, Wt_k), logits (B, K).
    Both terms of a stage come from one fused pass (``ops.sa_loss_terms``: Triton on CUDA, PyTorch otherwise).

    Args:
        student_channels, teacher_channels: channels of each stage pair (the connectors are built from them).
        SA options (`SA_OPTIONS`), name (default): meaning:
{sa_options}

    The defaults are the measured ones: docs/method.md#defaults says where each comes from.

    Reference: Wang & Liu, "Knowledge distillation algorithm based on spatial attention map", Application Research
    of Computers 41(6), 2024; built from CWD (Shu 2021), AT (Zagoruyko 2017) and a SimKD-style connector.
    Terms: ``{'sa_dist', 'sa_att'}`` and ``'sa_kd'`` when kd_weight > 0.
    """

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            tau: float = _DEFAULTS['tau'],
            p: float = _DEFAULTS['p'],
            alpha: float = _DEFAULTS['alpha'],
            beta: float = _DEFAULTS['beta'],
            kd_weight: float = _DEFAULTS['kd_weight'],
            temperature: float = _DEFAULTS['temperature'],
            connector: str = _DEFAULTS['connector'],
            backend: str = _DEFAULTS['backend'],
    ):
        super().__init__(student_channels, teacher_channels)
        if tau <= 0 or temperature <= 0:
            raise ValueError(f"tau and temperature must be positive, got tau={tau}, temperature={temperature}.")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}.")
        if backend not in ops.BACKENDS:
            raise ValueError(f"Unknown backend '{backend}'; use one of {', '.join(ops.BACKENDS)}.")
        self.tau = tau
        self.p = p
        self.alpha = alpha
        self.beta = beta
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.backend = backend
        self.connectors = ConnectorList(connector, self.student_channels, self.teacher_channels)

    def stage_terms(self, student_feats, teacher_feats) -> torch.Tensor:
        """Unweighted (L_dist, L_att) of every stage pair: a (K, 2) float32 tensor."""
        self.check_features(student_feats, teacher_feats)
        return self.projected_terms(self.connectors.pairs(student_feats, teacher_feats))

    def projected_terms(self, pairs) -> torch.Tensor:
        """(K, 2) float32 (L_dist, L_att) of (projected student, teacher) pairs, each (B, Ct_k, Ht_k, Wt_k)."""
        return torch.stack([
            torch.stack(ops.sa_loss_terms(s, t, self.tau, self.p, backend=self.backend)) for s, t in pairs
        ]).float()

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        dist, att = self.stage_terms(student_feats, teacher_feats).mean(dim=0)
        terms = {'sa_dist': self.alpha * dist, 'sa_att': self.beta * att}
        if self.kd_weight:
            if student_logits is None or teacher_logits is None:
                raise ValueError(f"SA's logit term (kd_weight={self.kd_weight}) needs student and teacher logits; "
                                 "pass them, or kd_weight=0 to distil features only.")
            terms['sa_kd'] = self.kd_weight * kd_divergence(student_logits, teacher_logits, self.temperature)
        return terms
