"""Attention-map pictures of an SA distillation: what the teacher attends to, and how close the student gets.

``attention_maps(task, images)`` computes, for every distilled stage pair, the teacher's spatial attention map and
the student's map *through its connector* (the space SA's loss compares), with the per-image SA stage loss.
``render_attention_maps`` draws them over the images into a PNG; ``save_attention_maps`` does both for a
training run; ``load_images`` and ``load_student_checkpoint`` bring image files and a trained student to draw. Plotting needs matplotlib (``pip install timm-sadistill[viz]``), imported only when drawing.
"""
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.models import clean_state_dict
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.model import unwrap_model

from . import ops
from ._atomic import atomic_write
from ._checkpoint_checks import check_checkpoint_readable, state_dict_mismatch
from .errors import MissingExtraError, UsageError
from .losses.sa import SADistillLoss
from .tasks.distill_task import DistillTask

__all__ = ['StageMaps', 'attention_maps', 'render_attention_maps', 'save_attention_maps', 'picture_path',
           'require_matplotlib', 'load_images', 'load_student_checkpoint']

_logger = logging.getLogger(__name__)

DEFAULT_FILENAME = 'attention_maps.png'


@dataclass
class StageMaps:
    """Maps and SA loss of one stage pair for a batch of B images, on the CPU, float32.

    teacher, student: (B, Ht, Wt) L2-normalised spatial attention maps at the teacher's map size; the student's
        is computed on its connector output, resized to the teacher's map, as the loss sees it.
    dist, att: (B,) unweighted L_dist and L_att of each image.
    alpha, beta: the loss's weights of the two terms.
    """
    student_stage: str
    teacher_stage: str
    teacher: torch.Tensor
    student: torch.Tensor
    dist: torch.Tensor
    att: torch.Tensor
    alpha: float
    beta: float

    @property
    def loss(self) -> torch.Tensor:
        """(B,) SA stage loss alpha * L_dist + beta * L_att of each image (weighted by alpha and beta only)."""
        return self.alpha * self.dist + self.beta * self.att


def _sa_loss_of(task: DistillTask) -> SADistillLoss:
    loss = task.distill_loss
    if not isinstance(loss, SADistillLoss):
        raise UsageError(
            f"Attention maps show SA's terms, but the task distils with {type(loss).__name__}; "
            "build the task with create_distill_task('sa', ...)."
        )
    return loss


def _attention_grid(x: torch.Tensor, loss: SADistillLoss) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) attention map with the loss's p and backend, float32 on the CPU."""
    flat = ops.spatial_attention(x, loss.p, backend=loss.backend)
    return rearrange(flat, 'b (h w) -> b h w', h=x.shape[-2], w=x.shape[-1]).float().cpu()


def attention_maps(task: DistillTask, images: torch.Tensor) -> List[StageMaps]:
    """Teacher and student attention maps and per-image SA loss of every distilled stage pair.

    Args:
        task: an SA task (``create_distill_task('sa', ...)``), possibly wrapped by DDP, compile or EMA.
        images: (B, C, H, W), normalised with the student's mean/std, as the task's ``forward`` takes them.

    Returns:
        one `StageMaps` per stage pair, in the task's order. The task is evaluated in eval mode (BatchNorm running
        statistics, so each image's loss does not depend on the others) and its training mode is restored.
    """
    loss = _sa_loss_of(task)
    trainable = unwrap_model(task.trainable_module)
    was_training = task.training
    task.eval()
    try:
        with torch.no_grad():
            images = images.to(device=task.student_mean.device, dtype=task.student_mean.dtype)
            # The same inputs the task's forward gives each model: the teacher sees its own normalisation.
            teacher_input = task.teacher.normalize_input(images, task.student_mean, task.student_std)
            _, teacher_feats = task.teacher_taps(teacher_input)
            _, student_feats = trainable.student_taps(images)
            pairs = loss.spatial_pairs(student_feats, teacher_feats)  # eval mode: per-image results
            # the terms average over the batch; one image at a time gives each image's own terms
            per_image = torch.stack([
                loss.projected_terms([(s[b:b + 1], t[b:b + 1]) for s, t in pairs]) for b in range(images.shape[0])
            ]).cpu()  # (B, K, 2)
            result = []
            for k, (projected, t) in enumerate(pairs):
                result.append(StageMaps(
                    student_stage=task.student_stages[k].name, teacher_stage=task.teacher_stages[k].name,
                    teacher=_attention_grid(t, loss), student=_attention_grid(projected, loss),
                    dist=per_image[:, k, 0], att=per_image[:, k, 1], alpha=float(loss.alpha), beta=float(loss.beta),
                ))
    finally:
        task.train(was_training)
    return result


def require_matplotlib() -> type:
    """matplotlib's `Figure` class; `MissingExtraError` (an ImportError) with the pip command when it is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingExtraError("Drawing attention maps needs matplotlib: install the viz extra: "
                          "pip install timm-sadistill[viz]") from e
    return Figure


def render_attention_maps(
        images: torch.Tensor,
        maps: Sequence[StageMaps],
        path: str,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        titles: Optional[Sequence[str]] = None,
        cell_inches: float = 1.9,
        dpi: int = 100,
) -> str:
    """Draw one row per image: the image, then per stage pair the teacher's and the student's map over it.

    Maps are upsampled bilinearly to the image and drawn with one colour scale per (image, stage), from 0 to the
    larger peak of the two maps, so that teacher and student compare by eye. Each student cell is titled with its
    image's SA stage loss ``L = alpha * L_dist + beta * L_att`` (weighted by the loss's alpha and beta; without the
    logit KD term and the task's distill weight).

    Args:
        images: (B, C, H, W) normalised with ``mean``/``std`` (the student's), as given to `attention_maps`.
        maps: `attention_maps`'s result for these images.
        path: the PNG to write (folders are created).
        mean, std: the normalisation to undo for display (the student's ``pretrained_cfg``).
        titles: one label per image (e.g. file names); default ``image <i>``.

    Returns:
        path.
    """
    Figure = require_matplotlib()
    images = images.detach().float().cpu()
    num_images, channels = images.shape[:2]
    if titles is not None and len(titles) != num_images:
        raise UsageError(f"titles must have one label per image, got {len(titles)} for {num_images} images.")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    shown = (images * std_t + mean_t).clamp(0, 1)
    shown = rearrange(shown, 'b c h w -> b h w c').numpy()
    if channels == 1:
        shown = shown[..., 0]
    size = images.shape[-2:]

    columns = 1 + 2 * len(maps)
    # Each row also holds two lines of titles above its cells, hence the extra height per row.
    fig = Figure(figsize=(columns * cell_inches, num_images * (cell_inches + 0.3) + 0.3), dpi=dpi)
    axes = fig.subplots(num_images, columns, squeeze=False)
    for row in range(num_images):
        axes[row, 0].imshow(shown[row], cmap='gray' if channels == 1 else None)
        axes[row, 0].set_title(titles[row] if titles is not None else f'image {row}', fontsize=8)
        for k, stage in enumerate(maps):
            pair = torch.stack([stage.teacher[row], stage.student[row]])[:, None]  # (2, 1, Ht, Wt)
            up = F.interpolate(pair, size=size, mode='bilinear', align_corners=False)[:, 0].numpy()
            vmax = float(max(stage.teacher[row].max(), stage.student[row].max()))
            labels = (
                f'teacher {stage.teacher_stage} ({stage.teacher.shape[-2]}x{stage.teacher.shape[-1]})',
                f'student {stage.student_stage}\nL={stage.loss[row]:.3g} (dist {stage.dist[row]:.3g}, '
                f'att {stage.att[row]:.3g})',
            )
            for j in range(2):
                ax = axes[row, 1 + 2 * k + j]
                ax.imshow(shown[row], cmap='gray' if channels == 1 else None)
                ax.imshow(up[j], cmap='jet', alpha=0.5, vmin=0.0, vmax=vmax)
                ax.set_title(labels[j], fontsize=7)
    for ax in axes.flat:
        ax.axis('off')
    if maps:
        fig.suptitle(f'SA stage loss L = {maps[0].alpha:g} * L_dist + {maps[0].beta:g} * L_att per image '
                     '(student maps through the connector)', fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp_path:  # replaces the picture (a symlink too), never writes through it
        fig.savefig(tmp_path, format='png')
    return path


def picture_path(path: str, option: str = 'path') -> str:
    """The PNG file ``path`` names: itself when it ends in .png, else ``<path>/attention_maps.png`` (a folder);
    UsageError, naming ``option``, for the name of another image file (it would become a folder)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == '.png':
        return path
    if suffix in get_img_extensions(as_set=True) | {'.pdf', '.svg', '.eps', '.tif'}:
        raise UsageError(f"{option} '{path}' names a {suffix} file, but the picture is a PNG; name it "
                         f"{os.path.splitext(path)[0]}.png, or pass a folder to receive {DEFAULT_FILENAME}.")
    return os.path.join(path, DEFAULT_FILENAME)


def save_attention_maps(
        task: DistillTask,
        images: Union[torch.Tensor, Iterable],
        path: str,
        max_images: Optional[int] = 4,
        titles: Optional[Sequence[str]] = None,
) -> str:
    """`attention_maps` + `render_attention_maps` for a few images, denormalised with the task's student mean/std.

    Args:
        task: an SA task.
        images: (B, C, H, W) normalised images, or a loader yielding ``(images, targets)`` (its first batch is used).
        path: a ``.png`` file, or a folder that receives ``attention_maps.png``.
        max_images: at most this many images (rows); None keeps all.
        titles: one label per image shown.

    Returns:
        the path of the PNG written.
    """
    require_matplotlib()  # fail before any forward pass when the picture cannot be drawn
    if not isinstance(images, torch.Tensor):
        batch = next(iter(images), None)
        if batch is None:
            raise UsageError("The loader given to save_attention_maps is empty; pass images or a non-empty loader.")
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if max_images is not None:
        images = images[:max_images]
    path = picture_path(path)
    maps = attention_maps(task, images)
    return render_attention_maps(
        images, maps, path, mean=task.student_mean.flatten().tolist(), std=task.student_std.flatten().tolist(),
        titles=titles,
    )


def load_images(paths: List[str], model: torch.nn.Module, img_size: Optional[int]) -> torch.Tensor:
    """(N, C, H, W) images resized, center-cropped and normalised as the model's eval transform does (timm's)."""
    from PIL import Image, UnidentifiedImageError

    in_chans = int(getattr(model, 'in_chans', 3))
    overrides = {'input_size': (in_chans, img_size, img_size)} if img_size else {}
    transform = create_transform(**resolve_data_config(overrides, model=model), is_training=False)
    tensors = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"image '{path}' does not exist; pass paths of image files (PNG, JPEG, ...)")
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert('RGB' if in_chans == 3 else 'L')))
        except UnidentifiedImageError:
            raise UsageError(f"'{path}' is not an image PIL can read; pass PNG or JPEG files") from None
        except OSError as e:  # PIL decodes on first use: a truncated file fails here, not in open
            raise UsageError(f"image '{path}' cannot be decoded ({e}); pass an intact image file") from None
    return torch.stack(tensors)


def _read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(student state_dict, task_state or None) from a ``train`` checkpoint or a bare student file."""
    checkpoint = check_checkpoint_readable(path, 'Student checkpoint')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path), None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a train run's "
                         "last.pth.tar or model.safetensors")
    if 'state_dict' in checkpoint:
        return clean_state_dict(checkpoint['state_dict']), checkpoint.get('task_state')
    return clean_state_dict(checkpoint), None  # a bare student state_dict saved with torch.save


def load_student_checkpoint(task: DistillTask, path: str) -> None:
    """Load the student and, when the checkpoint has them, the SA connectors into ``task``.

    Without connector state (a bare ``model.safetensors``) the connectors stay freshly initialised, so the student
    maps (drawn through them) do not show what training reached: a warning says so.
    """
    state_dict, task_state = _read_checkpoint(path)
    if not (task_state or {}).get('distill_loss'):
        _logger.warning(f"'{path}' has no connector state: the student maps go through fresh, untrained connectors. "
                        "Pass the train run's last.pth.tar (it holds them) to see the trained ones.")
    try:
        if task_state:
            task.load_checkpoint_state(state_dict, task_state)
        else:
            task.get_eval_model().load_state_dict(state_dict)
    except RuntimeError as e:
        raise UsageError(
            f"checkpoint '{path}' does not fit this student/connectors ({state_dict_mismatch(e)}); pass the --model, "
            "--num-classes, --img-size, stage and --sa-connector flags of the training run"
        ) from None
