"""Register a new distillation loss and train with it through the same task as SA.

    python examples/custom_loss.py

The example adds similarity-preserving KD (Tung & Mori, ICCV 2019): the (B, B) Gram matrices of the
flattened stage features of student and teacher, row-normalised, should match. It needs no connector,
since a Gram matrix does not depend on the channel count.

Its option ``weight`` is declared once, in the constructor (typed, defaulted, documented in ``Args:``): that
makes it a keyword of ``create_distill_task('sp', ...)`` and, once the command line imports this module (an
entry point in the group ``timm_sadistill.losses``), the flag ``--sp-weight`` of ``timm-sadistill train``.
"""
from typing import Annotated, Dict, Optional

import timm
import torch
import torch.nn.functional as F
from einops import rearrange

import timm_sadistill as tsd


@tsd.register_distill_loss('sp')
class SimilarityPreservingLoss(tsd.DistillLoss):
    """SP: weight * mean_k 1/B^2 * ||normalize(G^S_k) - normalize(G^T_k)||_F^2, G_k = F_k F_k^T of (B, C*H*W) rows.

    Args:
        weight: weight of the similarity-preserving term.
    """
    stage_policy = 'last'

    def __init__(self, student_channels=(), teacher_channels=(), weight: Annotated[float, tsd.NonNegative] = 3000.0):
        super().__init__(student_channels, teacher_channels)
        self.weight = weight

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.check_features(student_feats, teacher_feats)
        losses = []
        for s, t in zip(student_feats, teacher_feats):
            s, t = rearrange(s.float(), 'b ... -> b (...)'), rearrange(t.float(), 'b ... -> b (...)')
            g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
            losses.append((g_s - g_t).pow(2).sum() / s.shape[0] ** 2)
        return {'sp': self.weight * torch.stack(losses).mean()}


def main():
    torch.manual_seed(0)
    print('registered losses:', tsd.list_distill_losses())
    teacher = timm.create_model('resnet18', num_classes=4).eval()
    student = timm.create_model('test_resnet', num_classes=4)
    task = tsd.create_distill_task('sp', student, teacher, img_size=64, verbose=False)
    optimizer = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-3)
    images, labels = torch.randn(16, 3, 64, 64), torch.randint(0, 4, (16,))
    task.train()
    for step in range(5):
        out = task(images, labels)
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
        print(f"step {step}: loss {out['loss'].item():.4f} task {out['task_loss'].item():.4f} sp {out['sp'].item():.4f}")


if __name__ == '__main__':
    main()
