"""`DistillTask`: feature and logit distillation as a `timm.task.TrainingTask`."""
import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, TrainingTask
from timm.utils.model import unwrap_model

from ..features import (
    FeatureTaps, StageInfo, StagesArg, check_input_size, head_map_pair, pair_stages, resolve_img_size,
)
from ..errors import UsageError
from ..losses import (
    DistillLoss, check_loss_options, create_distill_loss, default_distill_loss, get_distill_loss_class,
    list_distill_losses, top1_hits,
)
from .teacher import check_input_channels, resolve_teacher
from .teacher_precision import resolve_teacher_amp_dtype
from .teacher_classes import resolve_teacher_classes

try:  # timm >= 1.0.25 builds the task criterion from keyword arguments
    from timm.task.classification import resolve_classification_loss
except ImportError:  # pragma: no cover - older timm
    resolve_classification_loss = None

__all__ = ['DistillTask', 'DistillTrainableModule', 'resolve_loss_weights']

_logger = logging.getLogger(__name__)


class DistillTrainableModule(nn.Module):
    """Everything that trains: the student (inside its stage taps) and the loss with its connectors.

    The distillation loss runs inside ``forward`` so that DDP, ``torch.compile`` and EMA see one module that owns
    every trainable parameter, as timm's ``FeatureDistillationTrainableModule`` does.
    """

    def __init__(self, student_taps: FeatureTaps, distill_loss: DistillLoss):
        super().__init__()
        self.student_taps = student_taps
        self.distill_loss = distill_loss

    @property
    def student(self) -> nn.Module:
        return self.student_taps.model

    def no_weight_decay(self):
        student = unwrap_model(self.student)
        if not hasattr(student, 'no_weight_decay'):
            return set()
        return {'student_taps.model.' + name for name in student.no_weight_decay()}

    def forward(
            self,
            input: torch.Tensor,
            teacher_feats: Sequence[torch.Tensor],
            teacher_logits: torch.Tensor,
            target: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """-> (student logits (B, K), the loss's weighted terms)."""
        logits, feats = self.student_taps(input)
        return logits, self.distill_loss(feats, teacher_feats, logits, teacher_logits, target)


def teacher_top1(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The teacher's top-1 (%) on a training batch, logits (B, K) against labels (B,) or the top class of soft
    targets (B, K): a teacher from elsewhere is wrong on a share of the student's own images, and there every logit
    term teaches against the label (docs/results.md#the-weak-teacher-search); each epoch's mean is in summary.csv."""
    return top1_hits(teacher_logits, target).mean() * 100.0


def resolve_loss_weights(
        distill_loss_weight: Optional[float],
        task_loss_weight: Optional[float],
) -> Tuple[float, float]:
    """(task weight, distill weight) by timm's rules: a distill weight alone keeps the task weight at 1, a task
    weight alone makes the distill weight 1 - task weight, neither gives 1 and 1."""
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else task_loss_weight), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


def _check_student_placement(student: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a student whose parameters are not all on the task's ``device`` in its ``dtype``, where the task puts
    the teacher and the connectors: the first forward would fail deep inside torch."""
    parameters = [p for p in student.parameters() if p.is_floating_point()]
    devices = sorted({str(p.device) for p in parameters})
    dtypes = sorted({str(p.dtype).replace('torch.', '') for p in parameters})
    same_place = all(p.device.type == device.type and (device.index is None or p.device.index == device.index)
                     for p in parameters)
    if not same_place:
        raise UsageError(
            f"The student's parameters are on {' and '.join(devices)}, but the task puts the teacher and the "
            f"connectors on {device}; move the student there first (student.to('{device}')), or create the task with "
            f"device=torch.device('{devices[0]}').")
    if any(p.dtype != dtype for p in parameters):
        wanted = str(dtype).replace('torch.', '')
        raise UsageError(
            f"The student's parameters are {' and '.join(dtypes)}, but the task builds the teacher and the "
            f"connectors in {wanted}; create the task with dtype=torch.{dtypes[0]}, or cast the student "
            f"(student.to(torch.{wanted})). For mixed precision keep float32 weights and use torch.autocast.")


def _check_labels(target: torch.Tensor, batch: int, num_classes: Optional[int], check_range: bool) -> None:
    """Refuse labels the criterion would take wrongly or fail on deep inside torch: class indices (B,) of an integer
    dtype in [0, num_classes), or soft targets (B, num_classes) of a float dtype (``num_classes`` None: a student
    without a head, whose labels' classes are not checked). The range needs the values, so it is checked where that
    costs no device sync (``check_range``)."""
    if not isinstance(target, torch.Tensor):
        raise UsageError(f"The labels are a {type(target).__name__}; pass a tensor of class indices (B,) or soft "
                         "targets (B, K).")
    if target.dim() == 1:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise UsageError(f"The labels are class indices of dtype {target.dtype}; class indices are integers: "
                             "pass target.long(), or soft targets of shape (B, K).")
        if target.shape[0] != batch:
            raise UsageError(f"The labels hold {target.shape[0]} class indices for a batch of {batch} images; pass "
                             "one label an image.")
        if check_range and num_classes and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise UsageError(f"The labels hold class indices from {int(target.min())} to {int(target.max())}, "
                             f"outside 0..{num_classes - 1} of the student's {num_classes} classes; build the models "
                             "with as many classes as the data has, or map the labels into that range.")
    elif target.dim() == 2:
        if not target.is_floating_point():
            raise UsageError(f"The labels are (B, K) soft targets of dtype {target.dtype}; soft targets are "
                             "probabilities: pass a float tensor, or class indices of shape (B,).")
        if target.shape[0] != batch or (num_classes and target.shape[1] != num_classes):
            raise UsageError(f"The labels are soft targets of shape {tuple(target.shape)} for {batch} images and "
                             f"{num_classes} classes; pass ({batch}, {num_classes}).")
    else:
        raise UsageError(f"The labels have shape {tuple(target.shape)}; pass class indices (B,) or soft targets (B, K).")


def _class_count_difference(student: nn.Module, t_classes: Optional[int]) -> str:
    """'the student has 10 classes and the teacher 100' when the student's class count differs from the teacher's
    ``t_classes`` (those it is distilled on), else ''."""
    s_classes = getattr(unwrap_model(student), 'num_classes', None)
    if s_classes is not None and t_classes is not None and s_classes != t_classes:
        return f"the student has {s_classes} classes and the teacher {t_classes}"
    return ''


def _requested_options(loss: Union[str, DistillLoss], temperature: Optional[float],
                       loss_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The loss options a task is given (None keeps a default, as an unset flag does; ``temperature`` is one), checked
    against the loss's declaration (`check_loss_options`); a built loss takes none."""
    options = {k: v for k, v in {**loss_kwargs, 'temperature': temperature}.items() if v is not None}
    if isinstance(loss, str):
        check_loss_options(loss, options)
    elif options:
        raise UsageError("Loss options go to create_distill_loss; a built loss takes none here.")
    return options


def _feature_only_methods() -> str:
    """The registered losses that compare no logits, with the options that make them so
    (`DistillLoss.feature_only_options`): ``'at, cwd, fitnet, or sa with kd_weight=0'``."""
    named = []
    for name in list_distill_losses():
        options = get_distill_loss_class(name).feature_only_options()
        if options is not None:
            with_options = ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in options.items())
            named.append((bool(options), f'{name} with {with_options}' if options else name))
    named = [text for _, text in sorted(named, key=lambda item: item[0])]  # plain names first
    return ', '.join(named[:-1]) + (', or ' if len(named) > 1 else '') + named[-1] if named else ''


def _check_class_counts(student: nn.Module, t_classes: Optional[int], loss_class: type) -> None:
    """Refuse, for a loss that compares the two models' logits, models with different class counts (the teacher's:
    ``t_classes``, those it is distilled on)."""
    differ = _class_count_difference(student, t_classes)
    if differ:
        others = _feature_only_methods()
        raise UsageError(
            f"{loss_class.__name__} compares the student's and the teacher's logits, but {differ}; build both with "
            f"the same {{option}}, or pass {{option.teacher_classes}} (the teacher's class of each student class) "
            "when the teacher's classes include the student's"
            + (f" (or use a feature-only method: {others})." if others else "."),
            option='num_classes',
        )


class DistillTask(TrainingTask):
    """Distil a frozen teacher into a student with any registered distillation loss.

    ``out = task(x, y)`` returns ``{'loss', 'output', 'task_loss', 'kd_loss', <each term of the loss>}`` with
    ``kd_loss`` the sum of the loss's terms and ``loss = task_loss_weight * task_loss + distill_loss_weight * kd_loss``.

    The teacher stays frozen (eval mode through ``train()``, no gradients); its input is renormalised when the two
    models' mean/std differ. ``task.to(memory_format=torch.channels_last)`` lays out the student, its connectors and
    the teacher channels-last (what ``--channels-last`` does), so the features the loss compares are channels-last
    too; under autocast the teacher runs in the autocast dtype, without gradients, unless ``teacher_amp_dtype`` sets
    its own. ``trainable_module`` holds the student and the loss's connectors, so an optimizer built from it trains
    both; ``get_eval_model()`` is the bare student; connectors travel in ``get_task_state()``.

    What the loss needs from the models it declares (`DistillLoss`): which stage pairs ``auto`` gives it
    (``stage_policy``), whether it compares logits (then the class counts must match: ``compares_logits``), and
    whether it takes the maps the heads take (``uses_final_pair``, e.g. SA's CAM term). Those it gets as an extra last
    stage pair (`timm_sadistill.features.head_map_pair`, the loss built with ``head_maps=True``); ``student_stages``
    and ``teacher_stages`` list it last, after the stages asked for, since it is distilled too. Where that pair cannot
    apply (a head takes tokens, the models have different class counts, a loss passed in was built without the
    heads' maps), the task builds the loss with those terms off (``without_final_pair``) and keeps the one-line
    notice that says so in ``notices`` (the model card lists them).

    Args:
        student_model: the timm model to train.
        teacher_model: a model name (weights from ``teacher_pretrained_path``), an nn.Module or a DistillationTeacher.
        loss: registered loss name (``tsd.list_distill_losses()``) or a built `DistillLoss`; None: the default
            loss (``tsd.losses.default_distill_loss()``, SA).
        criterion, criterion_kwargs: the task loss, as in timm's tasks (cross-entropy by default).
        teacher_pretrained_path: checkpoint for a teacher given by name.
        teacher_pretrained: allow a teacher given by name to load weights from the hub.
        teacher_pretrained_cfg_overlay: timm pretrained cfg overrides for a teacher given by name.
        distill_loss_weight, task_loss_weight: weights, with timm's rules (`resolve_loss_weights`).
        temperature: logit temperature for losses that have one (None keeps the loss's default).
        student_stages, teacher_stages: stages to distil: ``'auto'``, names, indices or submodule paths.
        img_size: (H, W) or N, the training input size: ``'auto'`` pairs stages at it, and a teacher given by name
            is built for it. Default: the student's input size; a forward on another size is then refused when
            ``'auto'`` chose the stages (it would distil maps the rule keeps out), naming ``img_size``.
        input_mean, input_std: the per-channel statistics the input batches are normalised with (a loader's
            ``mean``/``std``, as ``--mean``/``--std`` set them); the teacher's input is renormalised from them to the
            teacher's own. Default: the student's ``pretrained_cfg`` statistics, as timm's DistillationTask assumes.
        teacher_amp_dtype: None (default): the teacher runs in the caller's precision, under the caller's autocast
            like the student. ``torch.bfloat16``/``'bfloat16'`` or ``torch.float16``/``'float16'``: the teacher
            alone runs under that autocast, inside the caller's if any, and its logits and features are cast back
            to the task's dtype (float32), so the loss compares them in float32; the student keeps the caller's
            autocast. Refused for a task that is not float32, or a dtype autocast on ``device`` cannot run in.
        compile_teacher: compile the teacher's forward (``torch.compile``, default settings) at its first call, with
            or without `compile` (which compiles it anew with its own settings, beside the student).
        device, dtype, verbose: as in timm's tasks; ``verbose`` also logs the task's `notices`.
        teacher_classes: for a teacher that knows more classes than the student (a pretrained ImageNet model, data of
            some of its classes): the teacher's class of each student class, in the student's order, as indices into
            its logits or as class names it knows (its ``label_names``, else, for an ImageNet class count, the
            synsets or the first names of the descriptions of ``timm.data.ImageNetInfo``). The teacher's logits are
            restricted to them (`restrict_teacher_logits`), for every term that reads them, and a teacher given by
            name is built with the classes of its weights. None: the teacher's classes are the student's.
        **loss_kwargs: the loss's own options (e.g. ``tau``, ``beta``, ``connector``; ``tsd.loss_options(name)``
            lists them); None keeps the loss's default, as an unset command-line flag does.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            loss: Union[None, str, DistillLoss] = None,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            teacher_pretrained_path: Optional[str] = None,
            teacher_pretrained: bool = False,
            teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            temperature: Optional[float] = None,
            student_stages: StagesArg = 'auto',
            teacher_stages: StagesArg = 'auto',
            img_size: Optional[Union[int, Sequence[int]]] = None,
            input_mean: Optional[Sequence[float]] = None,
            input_std: Optional[Sequence[float]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            teacher_amp_dtype: Union[None, str, torch.dtype] = None,
            compile_teacher: bool = False,
            teacher_classes: Optional[Sequence[Union[int, str]]] = None,
            **loss_kwargs,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        _check_student_placement(student_model, self.device, self.dtype)
        loss = default_distill_loss() if loss is None else loss
        options = _requested_options(loss, temperature, loss_kwargs)  # a mistake fails here, before the teacher loads
        self.teacher_amp_dtype = resolve_teacher_amp_dtype(teacher_amp_dtype, self.device, self.dtype)
        self.teacher = resolve_teacher(
            teacher_model, student_model, teacher_pretrained_path, teacher_pretrained,
            teacher_pretrained_cfg_overlay, self.device, self.dtype, img_size, own_classes=teacher_classes is not None,
        )
        self._set_teacher_classes(teacher_classes, student_model)
        hw = resolve_img_size(img_size, student_model)
        for role, model in (('student', student_model), ('teacher', self.teacher.model)):
            check_input_size(model, hw, role=role)
        if criterion is None and resolve_classification_loss is not None:
            criterion = resolve_classification_loss(None, self.device, criterion_kwargs=criterion_kwargs)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.task_loss_weight, self.distill_loss_weight = resolve_loss_weights(distill_loss_weight, task_loss_weight)
        # one-line notices of what the task changed for this pair (a term that cannot apply, turned off)
        self.notices: List[str] = []
        # decided before the loss is built: its connectors depend on the pairs
        head_maps, options = self._fit_loss_to_pair(student_model, loss, options, hw)
        s_stages, t_stages = self._pair_stages(student_model, loss, student_stages, teacher_stages, img_size, hw)
        if head_maps is not None:  # the maps each model's head takes ride as an extra last pair
            s_stages, t_stages = [*s_stages, head_maps[0]], [*t_stages, head_maps[1]]
        student_taps = FeatureTaps(student_model, s_stages, img_size=hw)
        # The teacher's weights are registered once, under self.teacher; its taps only read them.
        teacher_taps = FeatureTaps(self.teacher.model, t_stages, img_size=hw)
        object.__setattr__(self, 'teacher_taps', torch.compile(teacher_taps) if compile_teacher else teacher_taps)
        if isinstance(loss, str):
            loss = create_distill_loss(
                loss, student_channels=student_taps.channels, teacher_channels=self.teacher_taps.channels,
                **options, **({'head_maps': True} if head_maps is not None else {}),
            )
        # teacher_classes only where there are some: a loss from before that keyword binds as it did
        loss.bind(unwrap_model(student_model), self.teacher.model,
                  **({'teacher_classes': self.teacher_class_index} if self.teacher_classes is not None else {}))
        # connectors are built on the CPU in the default dtype, and a built loss may live anywhere: the student's
        self.trainable_module = DistillTrainableModule(student_taps, loss.to(device=self.device, dtype=self.dtype))
        self._set_input_statistics(student_model, input_mean, input_std)
        self._labels_seen = False
        if self.verbose:
            self._log_setup(student_taps)

    def _set_teacher_classes(self, teacher_classes: Optional[Sequence[Union[int, str]]], student: nn.Module) -> None:
        """``teacher_classes`` as indices (`resolve_teacher_classes`) and the (K,) long buffer the teacher's logits are
        restricted by (None without them), and the count of the teacher's classes the task distils on."""
        self.teacher_classes: Optional[List[int]] = None
        if teacher_classes is not None:
            self.teacher_classes = resolve_teacher_classes(teacher_classes, self.teacher.model, student)
        index = None if self.teacher_classes is None else torch.tensor(self.teacher_classes, device=self.device)
        self.register_buffer('teacher_class_index', index, persistent=False)  # moves with the task
        self.teacher_num_classes: Optional[int] = (
            len(self.teacher_classes) if self.teacher_classes is not None
            else getattr(unwrap_model(self.teacher.model), 'num_classes', None))

    def _fit_loss_to_pair(
            self,
            student: nn.Module,
            loss: Union[str, DistillLoss],
            options: Dict[str, Any],
            hw: Tuple[int, int],
    ) -> Tuple[Optional[Tuple[StageInfo, StageInfo]], Dict[str, Any]]:
        """What the loss asks of this pair of models, as it declares it: the pair of the maps the heads take when it
        `uses_final_pair` and both heads take maps (else None), and the options to build a loss named by ``loss``
        with (``without_final_pair``'s where that pair cannot apply, its notice kept in `notices`). Refuses models of
        different class counts for a loss that `compares_logits`."""
        loss_class = type(loss) if isinstance(loss, DistillLoss) else get_distill_loss_class(loss)
        # a built loss of a registered class records its options; another one has only its attributes
        declared = options if isinstance(loss, str) else getattr(loss, 'option_values', vars(loss))
        head_maps, notice, fitted = None, '', declared
        if loss_class.uses_final_pair(**declared):
            # the terms on the heads' maps compare class by class, and a loss built on its own has no such pair
            why = _class_count_difference(student, self.teacher_num_classes) or (
                '' if isinstance(loss, str) or loss.head_maps else
                f"the {loss_class.__name__} passed in was built without the maps the heads take (head_maps=False)")
            if not why:
                head_maps, why = head_map_pair(student, self.teacher.model, hw)
            if head_maps is None:
                fitted, notice = loss_class.without_final_pair(why, **declared)
        # the logit term still refuses other classes: only the terms on the heads' maps turn off for them
        if loss_class.compares_logits(**fitted):
            _check_class_counts(student, self.teacher_num_classes, loss_class)
        if notice:
            if not isinstance(loss, str) and loss.head_maps:
                changed = ', '.join(f'{k}={v}' for k, v in fitted.items() if declared.get(k) != v)
                raise UsageError(f"The {loss_class.__name__} passed in was built to distil the maps the heads "
                                 f"take (head_maps=True), but {why}; build it with head_maps=False and {changed}, "
                                 "or pass the loss by name for the task to turn that off for this pair.")
            self.notices.append(notice)
            if self.verbose:
                _logger.warning(notice)
        return head_maps, fitted if isinstance(loss, str) else {}

    def _pair_stages(
            self,
            student: nn.Module,
            loss: Union[str, DistillLoss],
            student_stages: StagesArg,
            teacher_stages: StagesArg,
            img_size: Optional[Union[int, Sequence[int]]],
            hw: Tuple[int, int],
    ) -> Tuple[List[StageInfo], List[StageInfo]]:
        """The stage pairs asked for (`pair_stages`, by the loss's ``stage_policy`` for ``auto``); keeps the input
        size ``auto`` chose them at, so that a forward on another size is refused (see `_check_input`)."""
        policy = (type(loss) if isinstance(loss, DistillLoss) else get_distill_loss_class(loss)).stage_policy
        s_stages, t_stages = pair_stages(
            student, self.teacher.model, student_stages, teacher_stages, img_size=hw, policy=policy,
        )
        auto = any(isinstance(x, str) and x == 'auto' for x in (student_stages, teacher_stages))
        self.auto_img_size: Optional[Tuple[int, int]] = hw if auto and s_stages else None
        self.img_size_given = img_size is not None
        return s_stages, t_stages

    def _set_input_statistics(
            self,
            student: nn.Module,
            input_mean: Optional[Sequence[float]],
            input_std: Optional[Sequence[float]],
    ) -> None:
        """The input's mean/std (1, C, 1, 1) buffers, the input channels both models take, and whether the teacher's
        input is renormalised to its own statistics."""
        base = unwrap_model(student)
        cfg = getattr(base, 'pretrained_cfg', None) or {}
        mean = input_mean if input_mean is not None else cfg.get('mean', (0.485, 0.456, 0.406))
        std = input_std if input_std is not None else cfg.get('std', (0.229, 0.224, 0.225))
        self.register_buffer('student_mean', torch.tensor(mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', torch.tensor(std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1), persistent=False)
        self.in_chans = check_input_channels(base, self.teacher, self.student_mean, self.student_std)
        # decided once: timm's normalize_input compares the statistics on every call, a data-dependent branch
        # that breaks the torch.compile graph of the step
        self.renormalize_teacher_input = not (torch.equal(self.student_mean, self.teacher.mean_kd)
                                              and torch.equal(self.student_std, self.teacher.std_kd))

    def _log_setup(self, student_taps: FeatureTaps) -> None:
        pairs = ', '.join(
            f'{s.name}->{t.name}' + (f' (resized /{s.reduction} -> /{t.reduction})' if s.reduction != t.reduction else '')
            for s, t in zip(student_taps.stages, self.teacher_taps.stages)
        )
        _logger.info(
            f"{type(self).__name__}: loss={type(self.distill_loss).__name__}, stages [{pairs or 'logits only'}], "
            f"task_weight={self.task_loss_weight}, distill_weight={self.distill_loss_weight}"
            + (f", teacher under {str(self.teacher_amp_dtype).replace('torch.', '')} autocast"
               if self.teacher_amp_dtype is not None else '')
            + (", teacher compiled" if hasattr(self.teacher_taps, '_orig_mod') else '')
        )

    @property
    def distill_loss(self) -> DistillLoss:
        return unwrap_model(self.trainable_module).distill_loss

    @property
    def student_stages(self):
        return unwrap_model(self.trainable_module).student_taps.stages

    @property
    def teacher_stages(self):
        return self.teacher_taps.stages

    def train(self, mode: bool = True) -> 'DistillTask':
        """Set the training mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'DistillTask':
        """Wrap student and connectors in DDP; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student eval path, the trainable module and the teacher's taps (anew with these settings where
        ``compile_teacher`` compiled them); returns the eval model."""
        trainable = unwrap_model(self.trainable_module)
        self.eval_model = torch.compile(trainable.student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        eager_taps = getattr(self.teacher_taps, '_orig_mod', self.teacher_taps)
        object.__setattr__(self, 'teacher_taps', torch.compile(eager_taps, backend=backend, mode=mode, **compile_kwargs))
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The bare student (through DDP, compile and EMA wrappers), or the compiled eval model."""
        resolved = super().get_eval_model(module=module, ema=ema)
        base = unwrap_model(resolved) if resolved is not None else None
        return base.student if isinstance(base, DistillTrainableModule) else resolved

    def _loss_of(self, module: Optional[nn.Module], ema: bool) -> Optional[DistillLoss]:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return None
        base = unwrap_model(module)
        if not isinstance(base, DistillTrainableModule):
            raise RuntimeError(f"{type(module).__name__} holds no DistillTrainableModule.")
        return base.distill_loss

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The loss's connectors (and any other loss state): ``{'distill_loss': state_dict}``."""
        loss = self._loss_of(module, ema)
        if loss is None:
            return {}
        state = loss.state_dict()
        return {'distill_loss': state} if state else {}

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        loss = self._loss_of(module, ema)
        if loss is None:
            raise RuntimeError("Cannot load EMA task state before setup_ema()." if ema else "No trainable module.")
        loss_state = (state or {}).get('distill_loss')
        if loss_state is None:
            if strict and any(True for _ in loss.state_dict()):
                raise RuntimeError(
                    f"The checkpoint has no connector state for {type(loss).__name__}; load it with strict=False "
                    "to start the connectors afresh."
                )
            return
        loss.load_state_dict(loss_state, strict=strict)

    def get_clip_parameters(self, exclude_head: bool = False) -> Iterable[nn.Parameter]:
        trainable = unwrap_model(self.trainable_module)
        parameters = list(trainable.student.parameters())
        if exclude_head:
            parameters = parameters[:-2]
        return parameters + list(trainable.distill_loss.parameters())

    def _check_input(self, input: torch.Tensor, target: torch.Tensor) -> None:
        """Refuse an input or labels the models were not set up for, before they fail deep inside them: shapes and
        dtypes every step, the labels' range where that costs no device sync and no graph break (on the CPU, eager;
        on a GPU, the first eager batch)."""
        if input.dim() != 4 or input.shape[0] == 0:
            raise UsageError(f"The input has shape {tuple(input.shape)}; pass a batch of images (B, C, H, W) with B >= "
                             "1 (skip empty batches, e.g. drop_last=True in the DataLoader).")
        num_classes = getattr(unwrap_model(self.trainable_module).student, 'num_classes', None) or None
        # the range reads values: not inside a compiled graph (a graph break), and on a GPU only once (a sync)
        reads_values = not torch.compiler.is_compiling() and (target.device.type == 'cpu' or not self._labels_seen)
        _check_labels(target, input.shape[0], num_classes, check_range=reads_values)
        if reads_values:
            self._labels_seen = True
        if input.shape[1] != self.in_chans:
            raise UsageError(
                f"The input has {input.shape[1]} channels but the student and teacher take {self.in_chans} "
                f"({{option:{self.in_chans}}}); feed {self.in_chans}-channel images, or build both models with "
                f"{{option:{input.shape[1]}}}.", option='in_chans',
            )
        hw = tuple(input.shape[-2:])
        if self.auto_img_size is not None and hw != self.auto_img_size:
            paired = f'{self.auto_img_size[0]}x{self.auto_img_size[1]}'
            given = (f'{{option:{paired}}}' if self.img_size_given
                     else f"input size {paired} (the student's default: no {{option}} given)")
            raise UsageError(
                f"'auto' chose the stage pairs at {given}, but the input is {hw[0]}x{hw[1]}: "
                f"pass {{option:{hw[0] if hw[0] == hw[1] else hw}}} to create the task, so that auto keeps only maps "
                f"of at least 4x4 at that size, or name the stages.", option='img_size',
            )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """input (B, C, H, W), target (B,) or (B, K) -> {'loss', 'output', 'task_loss', 'kd_loss', terms...}."""
        self._check_input(input, target)
        # no_grad, not inference_mode: the loss's backward saves the teacher's features, which inference tensors
        # cannot be
        with torch.no_grad():
            teacher_logits, teacher_feats = self.teacher_outputs(self.teacher_input(input))
        logits, terms = self.trainable_module(input, teacher_feats, teacher_logits, target)
        result = self.combine(logits, terms, target)
        if teacher_logits.shape[-1] == logits.shape[-1]:
            result['teacher_top1'] = teacher_top1(teacher_logits, target)
        result.update(self.distill_loss.reports())
        return result

    def teacher_outputs(self, input: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The teacher's (logits (B, K), [features of each stage]) of its input (`teacher_input`), its logits those
        of the student's classes (`restrict_teacher_logits`). Without ``teacher_amp_dtype`` the teacher runs as the
        caller's autocast (if any) runs the student; with it, under its own autocast, and its outputs come back in
        the task's dtype: the loss compares them in float32, as it would the full-precision ones."""
        if self.teacher_amp_dtype is None:
            logits, feats = self.teacher_taps(input)
        else:
            with torch.autocast(input.device.type, dtype=self.teacher_amp_dtype):
                logits, feats = self.teacher_taps(input)
            logits, feats = logits.to(self.dtype), [f.to(self.dtype) for f in feats]
        return self.restrict_teacher_logits(logits), feats

    def restrict_teacher_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (B, K_teacher) of the student's classes, (B, K) in the student's order
        (``teacher_classes``); all of them without."""
        if self.teacher_class_index is None:
            return logits
        return logits.index_select(-1, self.teacher_class_index)

    def teacher_input(self, input: torch.Tensor) -> torch.Tensor:
        """The student's input (B, C, H, W) renormalised from the student's mean/std to the teacher's."""
        if not self.renormalize_teacher_input:
            return input
        return (input * self.student_std + self.student_mean - self.teacher.mean_kd) / self.teacher.std_kd

    def combine(self, logits: torch.Tensor, terms: Dict[str, torch.Tensor], target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The result dict of `forward` from the student's logits (B, K) and the loss's weighted terms."""
        task_loss = self.criterion(logits, target)
        kd_loss = torch.stack([v.float() for v in terms.values()]).sum()
        return {
            'loss': self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss,
            'output': logits,
            'task_loss': task_loss,
            'kd_loss': kd_loss,
            **terms,
        }
