"""`DistillTask`: feature and logit distillation as a `timm.task.TrainingTask`."""
import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import create_model
from timm.task import DistillationTeacher, TrainingTask
from timm.utils.model import unwrap_model

from .._checkpoint_checks import check_checkpoint_readable, state_dict_mismatch
from ..features import (
    FeatureTaps, StagesArg, check_input_size, head_map_pair, input_size_kwargs, pair_stages, resolve_img_size,
)
from ..errors import UsageError
from ..losses import DistillLoss, check_loss_options, create_distill_loss, get_distill_loss_class
from ..model_folder import ModelName, check_pretrained_available, resolve_model_name

try:  # timm >= 1.0.25 builds the task criterion from keyword arguments
    from timm.task.classification import resolve_classification_loss
except ImportError:  # pragma: no cover - older timm
    resolve_classification_loss = None

__all__ = ['DistillTask', 'DistillTrainableModule', 'check_teacher_weights', 'resolve_teacher', 'resolve_loss_weights']

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


def check_teacher_weights(
        teacher: str,
        pretrained_path: Optional[str],
        pretrained: bool,
        path_option: str = 'teacher_pretrained_path=<checkpoint>',
        hub_option: str = 'teacher_pretrained=True',
        name_option: str = 'teacher_model',
) -> ModelName:
    """What teacher name ``teacher`` names (`resolve_model_name`), refused when it cannot get weights: its checkpoint
    must be a readable file (`CheckpointReadError`, a UsageError); without one, only leave to download
    (``pretrained``) will do, and with the Hub off only weights in the local cache. A ``local-dir:<folder>`` (or
    cached ``hf-hub:``) teacher brings its own weights, and its config.json rides along in the result.

    ``path_option``, ``hub_option`` and ``name_option`` name the options in the caller's words: the command line
    checks its flags before anything is built and says ``--teacher-checkpoint FILE``, ``--teacher-pretrained`` and
    ``--teacher``.
    """
    source = resolve_model_name(teacher, name_option, allow_download=pretrained, download_option=hub_option)
    if source.has_weights:
        if pretrained_path:
            raise UsageError(f"Teacher '{teacher}' loads its weights from its folder; drop {path_option}.")
    elif pretrained_path:  # a missing file, a folder, a truncated file: each with its own message
        check_checkpoint_readable(pretrained_path, 'Teacher checkpoint')
    elif not pretrained:
        raise UsageError(f"Teacher '{teacher}' has no weights: pass {path_option} (safetensors or timm .pth), or "
                         f"{hub_option} to download them from the hub.")
    elif ':' not in teacher:  # a registry name: its published weights
        check_pretrained_available(teacher, hub_option)
    return source


def resolve_teacher(
        teacher: Union[str, nn.Module, DistillationTeacher],
        student: nn.Module,
        pretrained_path: Optional[str] = None,
        pretrained: bool = False,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        img_size: Optional[Union[int, Sequence[int]]] = None,
) -> DistillationTeacher:
    """A frozen `DistillationTeacher` from a model name, a module or a teacher.

    A name loads its weights from ``pretrained_path`` (safetensors or a timm checkpoint), a ``local-dir:<folder>``
    name from its folder (config.json and weights, as `timm_sadistill.model_folder` writes them); only
    ``pretrained=True`` lets timm fetch them from the hub. The number of classes and input channels follow the student,
    and a fixed-size model (ViT, Swin) is built for ``img_size`` (default: the student's input size).
    """
    given = teacher.model if isinstance(teacher, DistillationTeacher) else teacher
    if isinstance(given, nn.Module) and unwrap_model(given) is unwrap_model(student):
        raise UsageError("The teacher is the student itself, and freezing the teacher would freeze the student; "
                         "pass another model as the teacher (e.g. a trained copy: copy.deepcopy(student)).")
    if isinstance(teacher, DistillationTeacher):
        resolved = teacher
    elif isinstance(teacher, str):
        source = check_teacher_weights(teacher, pretrained_path, pretrained)
        base = unwrap_model(student)
        folder_classes = source.num_classes
        if folder_classes is not None and folder_classes != base.num_classes:
            raise UsageError(f"Teacher '{teacher}' has {folder_classes} classes and the student {base.num_classes}; "
                             f"create the student with num_classes={folder_classes}.")
        # DistillationTeacher(name) as timm builds it, plus the input size that a fixed-size model needs
        overlay = {**(dict(file=pretrained_path, num_classes=base.num_classes) if pretrained_path else {}),
                   **(pretrained_cfg_overlay or {})}
        try:
            model = create_model(
                source.load_name, pretrained=True, pretrained_cfg_overlay=overlay or None, num_classes=base.num_classes,
                in_chans=getattr(base, 'in_chans', 3), device=device, dtype=dtype,
                **input_size_kwargs(source.architecture, resolve_img_size(img_size, base)),
            )
        except RuntimeError as e:
            if source.has_weights:
                raise UsageError(
                    f"The weights of '{teacher}' do not fit the architecture its config.json names; export the "
                    f"folder again. Details: {state_dict_mismatch(e)}"
                ) from e
            if not pretrained_path:
                raise
            raise UsageError(
                f"Teacher checkpoint '{pretrained_path}' does not fit '{teacher}' with {base.num_classes} classes; "
                f"check --teacher / the student's num_classes. Details: {state_dict_mismatch(e)}"
            ) from e
        resolved = DistillationTeacher(model, device=device, dtype=dtype)
    elif isinstance(teacher, nn.Module):
        resolved = DistillationTeacher(teacher, device=device, dtype=dtype)
    else:
        raise UsageError(f"teacher must be a model name, an nn.Module or a DistillationTeacher, got {type(teacher).__name__}.")
    resolved.eval()
    resolved.requires_grad_(False)
    return resolved


def _input_channels(model: nn.Module) -> Optional[int]:
    """Input channels of a timm model: its ``in_chans``, else those of the conv its ``pretrained_cfg`` names first."""
    base = unwrap_model(model)
    if hasattr(base, 'in_chans'):
        return int(base.in_chans)
    first = (getattr(base, 'pretrained_cfg', None) or {}).get('first_conv')
    first = first[0] if isinstance(first, (list, tuple)) else first
    return getattr(dict(base.named_modules()).get(first or ''), 'in_channels', None)


def _check_input_channels(
        student: nn.Module,
        teacher: DistillationTeacher,
        student_mean: torch.Tensor,
        student_std: torch.Tensor,
) -> int:
    """The input channels C both models take; refuses models of different C, and a renormalisation for the teacher
    (student mean/std -> teacher mean/std, (1, C, 1, 1) each) that the channels cannot take (timm keeps 3-entry
    ImageNet statistics in the cfg of a 1-channel model)."""
    s_chans = _input_channels(student) or student_mean.shape[1]
    t_chans = _input_channels(teacher.model) or s_chans
    if s_chans != t_chans:
        raise UsageError(
            f"The student takes {s_chans}-channel inputs and the teacher {t_chans}-channel inputs; build both with "
            f"the same in_chans."
        )
    same_stats = torch.equal(student_mean, teacher.mean_kd) and torch.equal(student_std, teacher.std_kd)
    sizes = {student_mean.shape[1], student_std.shape[1], teacher.mean_kd.shape[1], teacher.std_kd.shape[1]}
    if not same_stats and sizes != {s_chans}:
        raise UsageError(
            f"The models take {s_chans}-channel inputs, but the teacher's input is renormalised from the student's "
            f"mean/std to its own and their pretrained_cfg statistics have {sorted(sizes)} entries; give both models "
            f"{s_chans}-entry statistics: timm.create_model(..., pretrained_cfg_overlay=dict(mean=..., std=...))."
        )
    return s_chans


def _class_count_difference(student: nn.Module, teacher: nn.Module) -> str:
    """'the student has 10 classes and the teacher 100' when the two models' class counts differ, else ''."""
    s_classes = getattr(unwrap_model(student), 'num_classes', None)
    t_classes = getattr(unwrap_model(teacher), 'num_classes', None)
    if s_classes is not None and t_classes is not None and s_classes != t_classes:
        return f"the student has {s_classes} classes and the teacher {t_classes}"
    return ''


def _check_class_counts(student: nn.Module, teacher: nn.Module, loss_class: type) -> None:
    """Refuse, for a loss that compares the two models' logits, models with different class counts."""
    differ = _class_count_difference(student, teacher)
    if differ:
        raise UsageError(
            f"{loss_class.__name__} compares the student's and the teacher's logits, but {differ}; build both with "
            f"the same num_classes (or use a feature-only method: at, fitnet, cwd, or sa with kd_weight=0)."
        )


class DistillTask(TrainingTask):
    """Distil a frozen teacher into a student with any registered distillation loss.

    ``out = task(x, y)`` returns ``{'loss', 'output', 'task_loss', 'kd_loss', <each term of the loss>}`` with
    ``kd_loss`` the sum of the loss's terms and ``loss = task_loss_weight * task_loss + distill_loss_weight * kd_loss``.

    The teacher stays frozen (eval mode through ``train()``, no gradients); its input is renormalised when the two
    models' mean/std differ. ``task.to(memory_format=torch.channels_last)`` lays out the student, its connectors and
    the teacher channels-last (what ``--channels-last`` does), so the features the loss compares are channels-last
    too; under autocast the teacher runs in the autocast dtype, without gradients. ``trainable_module`` holds the student and the loss's connectors, so an optimizer built
    from it trains both; ``get_eval_model()`` is the bare student; connectors travel in ``get_task_state()``.

    A loss that uses the maps the heads take (SA's CAM term) gets them as an extra last stage pair
    (`timm_sadistill.features.head_map_stage`, built with ``head_maps=True``); ``student_stages`` and
    ``teacher_stages`` list it last, after the stages asked for, since it is distilled too. Where the term cannot
    apply (a head takes tokens, the models have different class counts, a loss passed in was built without the
    heads' maps), the task builds the loss with those terms off (``loss.without_final_pair``) and keeps the one-line
    notice that says so in ``notices`` (the model card lists them).

    Args:
        student_model: the timm model to train.
        teacher_model: a model name (weights from ``teacher_pretrained_path``), an nn.Module or a DistillationTeacher.
        loss: registered loss name (``tsd.list_distill_losses()``) or a built `DistillLoss`.
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
        device, dtype, verbose: as in timm's tasks; ``verbose`` also logs the task's `notices`.
        **loss_kwargs: the loss's own options (e.g. ``tau``, ``beta``, ``connector``; ``tsd.loss_options(name)``
            lists them); None keeps the loss's default, as an unset command-line flag does.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            loss: Union[str, DistillLoss] = 'sa',
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
            **loss_kwargs,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        loss_kwargs = {k: v for k, v in loss_kwargs.items() if v is not None}
        if isinstance(loss, str):  # a mistaken option fails here, before the teacher loads
            check_loss_options(loss, {**loss_kwargs, **({} if temperature is None else {'temperature': temperature})})
        self.teacher = resolve_teacher(
            teacher_model, student_model, teacher_pretrained_path, teacher_pretrained,
            teacher_pretrained_cfg_overlay, self.device, self.dtype, img_size,
        )
        hw = resolve_img_size(img_size, student_model)
        for role, model in (('student', student_model), ('teacher', self.teacher.model)):
            check_input_size(model, hw, role=role)
        if criterion is None and resolve_classification_loss is not None:
            criterion = resolve_classification_loss(None, self.device, criterion_kwargs=criterion_kwargs)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.task_loss_weight, self.distill_loss_weight = resolve_loss_weights(distill_loss_weight, task_loss_weight)

        loss_class = type(loss) if isinstance(loss, DistillLoss) else get_distill_loss_class(loss)
        # a built loss of a registered class records its options; another one has only its attributes
        loss_options = loss_kwargs if isinstance(loss, str) else getattr(loss, 'option_values', vars(loss))
        # one-line notices of what the task changed for this pair (a term that cannot apply, turned off)
        self.notices: List[str] = []
        head_maps, notice, fitted = None, '', loss_options
        # decided before the loss is built: its connectors depend on the pairs
        if loss_class.uses_final_pair(**loss_options):
            # the terms on the heads' maps compare class by class, and a loss built on its own has no such pair
            why = _class_count_difference(student_model, self.teacher.model) or (
                '' if isinstance(loss, str) or loss.head_maps else
                f"the {loss_class.__name__} passed in was built without the maps the heads take (head_maps=False)")
            if not why:
                head_maps, why = head_map_pair(student_model, self.teacher.model, hw)
            if head_maps is None:
                fitted, notice = loss_class.without_final_pair(why, **loss_options)
        # the logit term still refuses other classes: only the terms on the heads' maps turn off for them
        if loss_class.compares_logits(**fitted):
            _check_class_counts(student_model, self.teacher.model, loss_class)
        if notice:
            if not isinstance(loss, str) and loss.head_maps:
                changed = ', '.join(f'{k}={v}' for k, v in fitted.items() if loss_options.get(k) != v)
                raise UsageError(f"The {loss_class.__name__} passed in was built to distil the maps the heads "
                                 f"take (head_maps=True), but {why}; build it with head_maps=False and {changed}, "
                                 "or pass the loss by name for the task to turn that off for this pair.")
            if isinstance(loss, str):
                loss_kwargs = fitted
            self.notices.append(notice)
            if self.verbose:
                _logger.warning(notice)
        policy = loss_class.stage_policy
        s_stages, t_stages = pair_stages(
            student_model, self.teacher.model, student_stages, teacher_stages, img_size=hw, policy=policy,
        )
        auto = any(isinstance(x, str) and x == 'auto' for x in (student_stages, teacher_stages))
        # the input size 'auto' chose the stages at: a forward on another size is refused (see _check_input)
        self.auto_img_size: Optional[Tuple[int, int]] = hw if auto and s_stages else None
        self.img_size_given = img_size is not None
        if head_maps is not None:
            # the maps each model's head takes ride as an extra last pair
            s_stages = [*s_stages, head_maps[0]]
            t_stages = [*t_stages, head_maps[1]]
        student_taps = FeatureTaps(student_model, s_stages, img_size=hw)
        # The teacher's weights are registered once, under self.teacher; its taps only read them.
        object.__setattr__(self, 'teacher_taps', FeatureTaps(self.teacher.model, t_stages, img_size=hw))
        if isinstance(loss, str):
            if temperature is not None:
                loss_kwargs['temperature'] = temperature
            loss = create_distill_loss(
                loss, student_channels=student_taps.channels, teacher_channels=self.teacher_taps.channels,
                **loss_kwargs, **({'head_maps': True} if head_maps is not None else {}),
            )
        elif loss_kwargs or temperature is not None:
            raise UsageError("Loss options go to create_distill_loss; a built loss takes none here.")
        loss.bind(unwrap_model(student_model), self.teacher.model)
        self.trainable_module = DistillTrainableModule(student_taps, loss.to(device=self.device))

        base = unwrap_model(student_model)
        cfg = getattr(base, 'pretrained_cfg', None) or {}
        mean = input_mean if input_mean is not None else cfg.get('mean', (0.485, 0.456, 0.406))
        std = input_std if input_std is not None else cfg.get('std', (0.229, 0.224, 0.225))
        self.register_buffer('student_mean', torch.tensor(mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', torch.tensor(std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1), persistent=False)
        self.in_chans = _check_input_channels(base, self.teacher, self.student_mean, self.student_std)
        # decided once: timm's normalize_input compares the statistics on every call, a data-dependent branch
        # that breaks the torch.compile graph of the step
        self.renormalize_teacher_input = not (torch.equal(self.student_mean, self.teacher.mean_kd)
                                              and torch.equal(self.student_std, self.teacher.std_kd))

        if self.verbose:
            pairs = ', '.join(
                f'{s.name}->{t.name}' + (f' (resized /{s.reduction} -> /{t.reduction})' if s.reduction != t.reduction else '')
                for s, t in zip(student_taps.stages, self.teacher_taps.stages)
            )
            _logger.info(
                f"{type(self).__name__}: loss={type(loss).__name__}, stages [{pairs or 'logits only'}], "
                f"task_weight={self.task_loss_weight}, distill_weight={self.distill_loss_weight}"
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
        """Compile the student eval path, the trainable module and the teacher's taps; returns the eval model."""
        trainable = unwrap_model(self.trainable_module)
        self.eval_model = torch.compile(trainable.student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        object.__setattr__(self, 'teacher_taps', torch.compile(self.teacher_taps, backend=backend, mode=mode, **compile_kwargs))
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

    def _check_input(self, input: torch.Tensor) -> None:
        """Refuse an input the models were not set up for, before it fails deep inside them (shape checks only)."""
        if input.shape[1] != self.in_chans:
            raise UsageError(
                f"The input has {input.shape[1]} channels but the student and teacher take {self.in_chans} "
                f"(in_chans={self.in_chans}); feed {self.in_chans}-channel images, or build both models with "
                f"in_chans={input.shape[1]}."
            )
        hw = tuple(input.shape[-2:])
        if self.auto_img_size is not None and hw != self.auto_img_size:
            paired = f'{self.auto_img_size[0]}x{self.auto_img_size[1]}'
            given = f'img_size={paired}' if self.img_size_given else f"input size {paired} (the student's default: no img_size given)"
            raise UsageError(
                f"'auto' chose the stage pairs at {given}, but the input is {hw[0]}x{hw[1]}: "
                f"pass img_size={hw[0] if hw[0] == hw[1] else hw} to create the task, so that auto keeps only maps "
                f"of at least 4x4 at that size, or name the stages."
            )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """input (B, C, H, W), target (B,) or (B, K) -> {'loss', 'output', 'task_loss', 'kd_loss', terms...}."""
        self._check_input(input)
        # no_grad, not inference_mode: the loss's backward saves the teacher's features, which inference tensors
        # cannot be; under autocast the teacher runs in the autocast dtype like the student
        with torch.no_grad():
            teacher_logits, teacher_feats = self.teacher_taps(self.teacher_input(input))
        logits, terms = self.trainable_module(input, teacher_feats, teacher_logits, target)
        return self.combine(logits, terms, target)

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
