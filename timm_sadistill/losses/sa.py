"""SA: spatial-attention-map distillation (Wang & Liu 2024), reconstructed from the abstract: docs/method.md is
its spec (#the-sa-loss for the formulas, #defaults for where each default comes from).

SA's options are `SADistillLoss`'s constructor parameters, each typed, defaulted and documented in its ``Args:``;
the loss registry reads them for the task's keywords, the ``--sa-*`` flags and the records of a run.
"""
from typing import Annotated, Any, Dict, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .. import ops
from ..errors import UsageError
from ..features import head_layout
from ._loss_options import HowNotWhat, NonNegative, Positive
from ._registry import loss_options, register_distill_loss
from .base import DistillLoss, label_indices, top1_hits
from .connectors import ConnectorList, ConnectorName
from .dist import dist_relations
from .kd import kd_divergence
from .lskd import lskd_divergence
from .teacher_lead_gate import GATES, TeacherLeadGate

__all__ = ['SADistillLoss']

# SA's logit term: Hinton's KD, DIST's inter + intra relations (losses/dist.py), or KD on standardised logits
# (losses/lskd.py)
LOGIT_LOSSES = ('kd', 'dist', 'lskd')
LOGIT_WEIGHTINGS = ('none', 'teacher_confidence', 'teacher_correct')  # how each sample's logit term is weighted
TEACHER_CORRECTIONS = ('none', 'swap')  # what the logit term does with the teacher's logits where it is wrong


def _class_activation_maps(model: nn.Module, x: torch.Tensor, layout: str) -> torch.Tensor:
    """CAM(b, k, i) = head(X_{b,:,i}): ``model.forward_head`` at every position i of x (B, C, H, W), each position a
    1x1 map in the head's ``layout``; -> (B, K, H, W)."""
    b, _, h, w = x.shape
    one_by_one = 'b c h w -> (b h w) c 1 1' if layout == 'NCHW' else 'b c h w -> (b h w) 1 1 c'
    per_position = model.forward_head(rearrange(x, one_by_one))
    return rearrange(per_position, '(b h w) k -> b k h w', b=b, h=h, w=w)


def standardize_positions(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each (b, c) map z-scored over its H*W positions (logit standardisation, Sun et al. CVPR 2024, per map)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.float().std(dim=(-2, -1), keepdim=True).to(x.dtype)
    return (x - mean) / (std + eps)


def spatial_attention_distance(s: torch.Tensor, t: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """L_att = 1/B sum_b || a(s)_b - a(t)_b ||^2 with the op's attention maps."""
    return (ops.spatial_attention(s, p, backend=backend) - ops.spatial_attention(t, p, backend=backend)).pow(2).sum(-1).mean()


def swap_label_and_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) logits with, in each row b whose top class a differs from labels[b] = y, z_ba and z_by traded (knowledge
    adjustment, Wen et al. 2021): y becomes the top class, every other logit stays; rows already right are unchanged."""
    top = logits.argmax(dim=-1, keepdim=True)
    label = labels.view(-1, 1)
    z_top, z_label = logits.gather(-1, top), logits.gather(-1, label)
    # where top == label both writes put back the value already there
    return logits.scatter(-1, top, z_label).scatter(-1, label, z_top)


@register_distill_loss('sa', default=True)
class SADistillLoss(DistillLoss):
    """SA: per stage pair k, with S'_k = g_k(S_k) the student map through a conv connector, resized to (Ht, Wt):

        L_dist,k = tau^2 / (B*Ct) * sum_{b,c} KL(softmax_i(T_bc / tau) || softmax_i(S'_bc / tau))
        L_att,k  = 1/B * sum_b || a(S')_b - a(T)_b ||_2^2,   a(X)_b = normalize_i(mean_c |X_{b,c,i}|^p)
        SA       = mean_k (alpha * L_dist,k + beta * L_att,k)  (+ kd_weight * logit term(logits, temperature))

    The logit term is KD (``logit_loss='kd'``), DIST's L_inter + L_intra (``logit_loss='dist'``, beta = gamma = 1),
    or LSKD, KD on each sample's z-scored logits (``logit_loss='lskd'``, `lskd_divergence`; temperature is its base
    temperature).
    ``logit_weighting='teacher_confidence'`` weights sample b's KD divergence (DIST: its inter term; the intra term
    spans the batch) by w_b = softmax(t_b)[y_b], the teacher's probability of the label at temperature 1 (for soft
    targets, sum_k softmax(t_b)_k y_bk), so samples the teacher gets wrong teach less: the reliability weighting of
    weighted soft labels (Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff
    Perspective", ICLR 2021) and confidence-aware KD, in its simplest form. ``logit_weighting='teacher_correct'``
    is its hard form, w_b = [argmax_k t_bk == y_b]: the logit term is off for the samples whose label the teacher
    gets wrong, where it would teach the student to contradict the label. ``teacher_correction='swap'`` keeps every
    sample and corrects the teacher instead: where argmax_k t_bk = a != y_b, the logits t_ba and t_by trade places
    (`swap_label_and_argmax`), so the label is the teacher's top class and the rest of its distribution is kept
    (knowledge adjustment: Wen, Lai & Qian, "Preparing Lessons: Improve Knowledge Distillation with Better
    Supervision", Neurocomputing 454, 2021). All three need the labels (soft targets: their top class).

    Shapes: student features (B, Cs_k, Hs_k, Ws_k), teacher features (B, Ct_k, Ht_k, Wt_k), logits (B, K).
    Both terms of a stage come from one fused pass (``ops.spatial_kl_and_attention``: Triton on CUDA, PyTorch otherwise).

    Args:
        student_channels, teacher_channels: channels of each stage pair (the connectors are built from them).
        tau: spatial softmax temperature.
        p: power of |x| in the attention map.
        alpha: weight of the spatial distribution term.
        beta: weight of the attention-map term.
        kd_weight: weight of the logit term (0: off).
        temperature: temperature of the logit term.
        logit_loss: the logit term, 'kd' (KL), 'dist' (DIST's correlations, at T 1) or 'lskd' (KL of z-scored logits, T 2).
        logit_weighting: per-sample weight of the logit term: 'none', 'teacher_confidence' (p of the label) or 'teacher_correct'.
        teacher_correction: 'none', or 'swap' (where the teacher is wrong, its top class and the label trade logits).
        gate: distil only while the teacher's running train top-1 beats the student's: 'none', 'while_ahead', 'until_caught_up'.
        connector: student->teacher connector.
        backend: fused ops: 'auto' (Triton on CUDA), 'triton' or 'torch'.
        standardize: z-score each (b, c) map over its positions before the spatial softmax.
        warmup_steps: ramp the feature terms linearly from 0 over this many training steps.
        ramp_steps: ramp the whole loss, logit term included, linearly from 0 over this many training steps.
        cam_weight: weight of the class-activation-map term (CAT-KD) on the maps the heads take (off for token heads).
        head_maps: the last channel pair is the maps the two heads take, for the CAM term (not an option: a task
            that taps them sets it; a loss built on its own has no heads to run, so every pair is spatial).

    The defaults are the measured ones: docs/method.md#defaults says where each comes from.

    Reference: Wang & Liu, "Knowledge distillation algorithm based on spatial attention map", Application Research
    of Computers 41(6), 2024; built from CWD (Shu 2021), AT (Zagoruyko 2017) and a SimKD-style connector.
    Terms: ``{'sa_dist', 'sa_att'}`` and, when kd_weight > 0, ``'sa_kd'`` (logit_loss 'kd'), ``'sa_dist_logits'``
    (logit_loss 'dist'; ``sa_dist`` is the spatial-distribution term) or ``'sa_lskd'`` (logit_loss 'lskd'); ``'sa_cam'`` when the loss has the heads'
    maps (``head_maps``, which needs cam_weight > 0; `cam_terms`).

    The CAM term takes an extra last stage pair, the maps each model's head takes (a task taps them:
    `timm_sadistill.features.head_map_stage`, the last ``feature_info`` map or ``forward_features``' output, and
    builds the loss with ``head_maps=True``); the spatial terms take the other pairs. A loss built on its own
    (``head_maps=False``, the default) has no heads to evaluate: every pair feeds the spatial terms and there is no
    CAM term, whatever cam_weight says. For a pair whose heads take tokens (ViT, Twins, LeViT), or whose models
    have different class counts (feature-only SA, kd_weight 0), a task builds the loss with cam_weight 0
    (`without_final_pair`): no extra pair, every pair feeds the spatial terms.
    """
    draws_attention_maps = True  # the pictures of timm_sadistill.attention_maps are SA's maps

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            tau: Annotated[float, Positive] = 4.0,
            p: Annotated[float, Positive] = 2.0,
            alpha: Annotated[float, NonNegative] = 1.0,
            beta: Annotated[float, NonNegative] = 10.0,
            kd_weight: Annotated[float, NonNegative] = 1.0,
            temperature: Annotated[float, Positive] = 16.0,
            logit_loss: Literal[LOGIT_LOSSES] = 'kd',
            logit_weighting: Literal[LOGIT_WEIGHTINGS] = 'none',
            teacher_correction: Literal[TEACHER_CORRECTIONS] = 'none',
            gate: Literal[GATES] = 'none',
            connector: ConnectorName = 'conv1x1',
            backend: Annotated[Literal[ops.BACKENDS], HowNotWhat] = 'auto',
            standardize: bool = False,
            warmup_steps: Annotated[int, NonNegative] = 0,
            ramp_steps: Annotated[int, NonNegative] = 0,
            cam_weight: Annotated[float, NonNegative] = 1.0,
            *,
            head_maps: bool = False,
    ):
        super().__init__(student_channels, teacher_channels)
        self.tau = tau
        self.p = p
        self.alpha = alpha
        self.beta = beta
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.logit_loss = logit_loss
        self.logit_weighting = logit_weighting
        self.teacher_correction = teacher_correction
        self.gate = gate
        self.teacher_lead = TeacherLeadGate(gate) if gate != 'none' else None
        self.backend = backend
        self.standardize = standardize
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = int(ramp_steps)
        self.cam_weight = cam_weight
        if head_maps and not self.uses_final_pair(cam_weight=cam_weight):
            raise UsageError("head_maps=True reserves the last pair for the CAM term, but {option:0}; build the "
                             "loss with head_maps=False (every pair spatial) or with {option} > 0.",
                             option='cam_weight', loss=self.loss_name)
        self.head_maps = head_maps
        # the final pair (the maps the heads take) feeds the CAM term only; the SA terms take the others
        spatial = len(self.student_channels) - (1 if head_maps else 0)
        self.connectors = ConnectorList(connector, self.student_channels[:spatial], self.teacher_channels[:spatial])
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))  # training steps seen, for the ramps
        # the teacher's classes that are the student's, set by bind for a teacher that knows more (None: the same)
        self.register_buffer('teacher_classes', None, persistent=False)

    @classmethod
    def uses_final_pair(cls, **options) -> bool:
        """The CAM term (cam_weight; unset, at its default) takes the final pair."""
        values = {**loss_options(cls.loss_name).defaults, **options}
        return bool(values['cam_weight'])

    @classmethod
    def without_final_pair(cls, why: str, **options) -> Tuple[Dict[str, Any], str]:
        """For a pair the CAM term cannot apply to (heads that take tokens, models of different class counts, a loss
        passed in without the heads' maps; ``why`` says which): the options with cam_weight 0 and the notice that
        says so (the CAM term is on by default, and a default never fails a pair)."""
        values = {**loss_options(cls.loss_name).defaults, **options}
        notice = (f"SA: cam_weight={values['cam_weight']} is off for this pair: {why}, so there are no "
                  "class-activation maps to compare; the other terms train as with cam_weight=0 (set cam_weight=0 "
                  "to silence this notice).")
        return {**options, 'cam_weight': 0.0}, notice

    @classmethod
    def feature_only_options(cls) -> Optional[Dict[str, Any]]:
        """kd_weight 0: for models of different class counts a task turns the CAM term off by itself."""
        return {'kd_weight': 0.0}

    @classmethod
    def compares_logits(cls, **options) -> bool:
        """The logit term (kd_weight, default on) and the class-activation maps (cam_weight) compare per class."""
        values = {**loss_options(cls.loss_name).defaults, **options}
        return bool(values['kd_weight'] or values['cam_weight'])

    def bind(self, student: nn.Module, teacher: nn.Module, teacher_classes: Optional[torch.Tensor] = None) -> None:
        """Keep the two models' heads and the layout each takes its maps in (`head_layout`) for the CAM term, and the
        teacher's classes that are the student's (``teacher_classes`` (K,), for a teacher that knows more): the
        teacher's CAMs are restricted to them.

        The task has checked that both heads take the final pair's maps (`head_map_stage`). The teacher is held
        outside the module tree: it is frozen and saved with its own checkpoint, not here.
        """
        if not self.head_maps:
            return
        self.teacher_classes = teacher_classes
        object.__setattr__(self, '_teacher', teacher)
        object.__setattr__(self, '_student', student)
        self.head_layouts = (head_layout(student), head_layout(teacher))

    def cam_terms(self, s_final: torch.Tensor, t_final: torch.Tensor) -> Dict[str, torch.Tensor]:
        """CAT-KD (class-activation maps) on the maps the two heads take, each (B, C, H, W) as the taps give it (a
        channels-last head gets it back in its layout).

        CAT-KD (Guo et al., CVPR 2023): CAM_X(b, k, i) = head_X(X_{b,:,i}) evaluated at every position i (for a
            linear head after average pooling, sum_c W_kc X_{b,c,i} + bias, whose mean over i is the logit);
            the teacher's restricted to the student's classes (``teacher_classes``) for a teacher that knows more;
            both CAMs are pooled to the smaller grid and L2-normalised over positions;
            L_cam = mean_{b,k} || cam_S - cam_T ||^2 * (number of positions).
        """
        if not hasattr(self, '_student'):
            raise UsageError("SA with head_maps=True runs both heads on the final pair: call "
                             "loss.bind(student, teacher) before the forward (a DistillTask does), or build the loss "
                             "with head_maps=False for spatial terms only.")
        s_layout, t_layout = self.head_layouts
        cam_s = _class_activation_maps(self._student, s_final, s_layout)
        with torch.no_grad():
            cam_t = _class_activation_maps(self._teacher, t_final, t_layout)
            if self.teacher_classes is not None:  # the rows of the teacher's head of the student's classes
                cam_t = cam_t.index_select(1, self.teacher_classes)
        size = (min(cam_s.shape[-2], cam_t.shape[-2]), min(cam_s.shape[-1], cam_t.shape[-1]))
        cam_s = F.normalize(rearrange(F.adaptive_avg_pool2d(cam_s.float(), size), 'b k h w -> b k (h w)'), dim=-1)
        cam_t = F.normalize(rearrange(F.adaptive_avg_pool2d(cam_t.float(), size), 'b k h w -> b k (h w)'), dim=-1)
        return {'sa_cam': self.cam_weight * (cam_s - cam_t).pow(2).sum(-1).mean()}

    def spatial_pairs(self, student_feats, teacher_feats):
        """[(projected student, teacher)] of the pairs SA's spatial terms take: all but the final pair when it is
        the heads' maps (``head_maps``). Each pair is (B, Ct_k, Ht_k, Wt_k)."""
        self.check_features(student_feats, teacher_feats)
        k = len(self.connectors)
        return self.connectors.pairs(student_feats[:k], teacher_feats[:k])

    def stage_terms(self, student_feats, teacher_feats) -> torch.Tensor:
        """Unweighted (L_dist, L_att) of every spatial stage pair: a (K, 2) float32 tensor."""
        return self.projected_terms(self.spatial_pairs(student_feats, teacher_feats))

    def projected_terms(self, pairs) -> torch.Tensor:
        """(K, 2) float32 (L_dist, L_att) of (projected student, teacher) pairs, each (B, Ct_k, Ht_k, Wt_k)."""
        if self.standardize:
            return torch.stack([torch.stack((
                ops.spatial_kl(standardize_positions(s), standardize_positions(t), self.tau, backend=self.backend),
                spatial_attention_distance(s, t, self.p, self.backend))) for s, t in pairs]).float()
        return torch.stack([
            torch.stack(ops.spatial_kl_and_attention(s, t, self.tau, self.p, backend=self.backend)) for s, t in pairs
        ]).float()

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        terms = {}
        if len(self.connectors):
            dist, att = self.stage_terms(student_feats, teacher_feats).mean(dim=0)
            terms = {'sa_dist': self.alpha * dist, 'sa_att': self.beta * att}
        if self.head_maps:
            terms.update(self.cam_terms(student_feats[-1], teacher_feats[-1]))
        if self.warmup_steps:
            ramp = self.ramp(self.warmup_steps)
            terms = {k: v * ramp for k, v in terms.items()}
        if self.kd_weight:
            if student_logits is None or teacher_logits is None:
                raise UsageError(f"SA's logit term ({{option:{self.kd_weight}}}) needs student and teacher logits; "
                                 "pass them, or {option:0} to distil features only.", option='kd_weight',
                                 loss=self.loss_name)
            terms.update(self.logit_terms(student_logits, teacher_logits, target))
        if self.ramp_steps:
            ramp = self.ramp(self.ramp_steps)
            terms = {k: v * ramp for k, v in terms.items()}
        if self.training and (self.warmup_steps or self.ramp_steps):
            self.steps += 1
        if self.teacher_lead is not None:
            if student_logits is None or teacher_logits is None:
                raise UsageError(f"{{option:{self.gate!r}}} compares the student's and the teacher's top-1 on the "
                                 "training batches, which needs both models' logits; pass them, or {option:'none'}.",
                                 option='gate', loss=self.loss_name)
            gate = self.teacher_lead(student_logits, teacher_logits, self.needed_target(target, 'gate'))
            terms = {k: v * gate for k, v in terms.items()}
        return terms

    def ramp(self, steps: int) -> torch.Tensor:
        """min(1, training steps seen / ``steps``), a tensor: reading the count back would sync the device."""
        return (self.steps.float() / steps).clamp(max=1.0)

    def logit_terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    target: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The logit term of logits (B, K), weighted by kd_weight, by its name."""
        weight = self.sample_weights(teacher_logits, target)
        if self.teacher_correction == 'swap':
            labels = label_indices(self.needed_target(target, 'teacher_correction'))
            teacher_logits = swap_label_and_argmax(teacher_logits, labels)
        if self.logit_loss == 'dist':
            inter, intra = dist_relations(student_logits, teacher_logits, self.temperature, weight)
            return {'sa_dist_logits': self.kd_weight * (inter + intra)}
        divergence = lskd_divergence if self.logit_loss == 'lskd' else kd_divergence
        return {f'sa_{self.logit_loss}': self.kd_weight * divergence(
            student_logits, teacher_logits, self.temperature, weight)}

    def reports(self) -> Dict[str, torch.Tensor]:
        """The gate of the last training step (1 on, 0 off) as ``distill_gate`` when there is one."""
        return {} if self.teacher_lead is None else {'distill_gate': self.teacher_lead.open.clone()}

    def sample_weights(self, teacher_logits: torch.Tensor, target: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B,) weights of the logit term's samples, or None for uniform ones (``logit_weighting='none'``)."""
        if self.logit_weighting == 'none':
            return None
        target = self.needed_target(target, 'logit_weighting')
        if self.logit_weighting == 'teacher_correct':
            return top1_hits(teacher_logits, target)
        p_t = teacher_logits.detach().float().softmax(dim=-1)
        if target.dim() == 2:
            return (p_t * target.float()).sum(-1)
        return p_t.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)

    def needed_target(self, target: Optional[torch.Tensor], option: str) -> torch.Tensor:
        """``target``, which ``option``'s value (not 'none') needs: refused when missing."""
        if target is None:
            raise UsageError(f"{{option:{getattr(self, option)!r}}} needs the labels: pass target (the task does), "
                             "or {option:'none'}.", option=option, loss=self.loss_name)
        return target
