"""An SA task step under torch.compile and in the layouts and precisions of fast training: dynamo captures the
step in one graph (the fused ops are custom ops it does not trace into, and nothing in the step breaks the graph),
and ``task.to(memory_format=torch.channels_last)`` under bf16 autocast hands the loss channels-last bf16 features
of the teacher and of the projected student."""
import pytest
import timm
import torch

import timm_sadistill as tsd
from timm_sadistill.losses.sa import SADistillLoss


def _sa_task(**loss_kwargs):
    torch.manual_seed(0)
    return tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4),
                                   timm.create_model('resnet18', num_classes=4), img_size=32, verbose=False,
                                   **loss_kwargs)


def _explain_step(task):
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    torch._dynamo.reset()
    return torch._dynamo.explain(lambda x, y: task(x, y)['loss'])(x, y)


# numpy, under the interpreter, warns on log2(0) of zero padding; the kernel masks those lanes
@pytest.mark.filterwarnings('ignore:divide by zero:RuntimeWarning')
@pytest.mark.slow
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_sa_step_is_one_graph(backend):
    task = _sa_task(backend=backend).train()
    explained = _explain_step(task)
    assert explained.graph_break_count == 0, [str(r) for r in explained.break_reasons]
    assert explained.graph_count == 1
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    fused = any('timm_sadistill.spatial_kl_and_attention_fwd' in target for target in targets)
    assert fused == (backend == 'triton')  # the kernels appear as one opaque op, never traced into


def test_channels_last_and_autocast_reach_the_loss(monkeypatch):
    task = _sa_task().train()
    task.to(memory_format=torch.channels_last)
    seen = {}

    def spy(self, pairs):
        seen['pairs'] = list(pairs)
        return original(self, pairs)

    original = SADistillLoss.projected_terms
    monkeypatch.setattr(SADistillLoss, 'projected_terms', spy)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(x, torch.tensor([0, 3]))
    assert seen['pairs']
    for student, teacher in seen['pairs']:
        for name, feature in (('projected student', student), ('teacher', teacher)):
            assert feature.dtype == torch.bfloat16, (name, feature.dtype)
            assert feature.is_contiguous(memory_format=torch.channels_last), (name, feature.stride())
    assert all(s.requires_grad and not t.requires_grad for s, t in seen['pairs'])
    out['loss'].backward()
