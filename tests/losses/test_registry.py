"""The loss registry, as timm's model registry."""
import pytest
import torch

import timm_sadistill as tsd
from test_losses import SA_DEFAULTS


def test_builtin_losses_are_registered():
    # every loss class the package exports is registered under its name, and nothing else is
    exported = [getattr(tsd.losses, name) for name in tsd.losses.__all__]
    classes = [c for c in exported
               if isinstance(c, type) and issubclass(c, tsd.DistillLoss) and c is not tsd.DistillLoss]
    assert len(classes) >= 7
    assert tsd.list_distill_losses() == sorted(c.loss_name for c in classes)
    assert [tsd.get_distill_loss_class(c.loss_name) for c in classes] == classes
    assert tsd.get_distill_loss_class('sa') is tsd.SADistillLoss
    assert isinstance(tsd.create_distill_loss('sa', student_channels=[64, 128], teacher_channels=[256, 512], tau=4.0),
                      tsd.SADistillLoss)


def test_third_party_loss_registers_and_duplicates_are_refused():
    @tsd.register_distill_loss('test_logit_l2')
    class LogitL2(tsd.DistillLoss):
        stage_policy = 'none'

        def forward(self, student_feats, teacher_feats, student_logits, teacher_logits, target=None):
            return {'logit_l2': (student_logits - teacher_logits).pow(2).mean()}

    try:
        assert 'test_logit_l2' in tsd.list_distill_losses()
        loss = tsd.create_distill_loss('test_logit_l2')
        terms = loss([], [], torch.ones(2, 3), torch.zeros(2, 3))
        assert float(terms['logit_l2']) == 1.0
        with pytest.raises(tsd.UsageError, match=r"'test_logit_l2' is already registered by .*LogitL2; pick another name"):
            tsd.register_distill_loss('test_logit_l2')(LogitL2)
        with pytest.raises(tsd.UsageError, match="'sa' is already registered"):
            tsd.register_distill_loss('sa')(LogitL2)
    finally:
        from timm_sadistill.losses import _registry
        _registry._LOSSES.pop('test_logit_l2', None)


def test_unknown_names_and_bad_classes_are_clear_errors():
    with pytest.raises(tsd.UsageError, match="Unknown distillation loss 'nope'; registered: at, cwd, dist, dkd, fitnet, kd, lskd, sa"):
        tsd.create_distill_loss('nope')
    with pytest.raises(tsd.UsageError, match='DistillLoss subclasses'):
        tsd.register_distill_loss('plain')(torch.nn.MSELoss)
    with pytest.raises(tsd.UsageError, match='non-empty string'):
        tsd.register_distill_loss('')
    with pytest.raises(ValueError, match="Unknown connector 'mlp'; use one of bottleneck, conv1x1, identity, regressor"):
        tsd.create_distill_loss('sa', student_channels=[4], teacher_channels=[8], connector='mlp')
    with pytest.raises(tsd.UsageError, match="Unknown mode 'fancy'; use one of code, paper"):
        tsd.create_distill_loss('at', student_channels=[4], teacher_channels=[8], mode='fancy')


def test_loss_options_list_each_option_with_its_default():
    options = tsd.loss_options('cwd')
    assert options.defaults == {'student_channels': (), 'teacher_channels': (), 'tau': 4.0, 'weight': 3.0,
                                'connector': 'conv1x1'}
    assert not options.takes_any
    assert tsd.loss_options('sa').defaults['connector'] == SA_DEFAULTS['connector']
    assert 'temperature' in tsd.loss_options('kd').defaults and 'temperature' not in tsd.loss_options('at').defaults


def test_a_loss_that_takes_any_option_gets_them_all():
    @tsd.register_distill_loss('test_open_options')
    class OpenOptions(tsd.DistillLoss):
        stage_policy = 'none'

        def __init__(self, student_channels=(), teacher_channels=(), **options):
            super().__init__(student_channels, teacher_channels)
            self.options = options

    try:
        assert tsd.loss_options('test_open_options').takes_any
        assert tsd.create_distill_loss('test_open_options', anything=1).options == {'anything': 1}
    finally:
        from timm_sadistill.losses import _registry
        _registry._LOSSES.pop('test_open_options', None)
