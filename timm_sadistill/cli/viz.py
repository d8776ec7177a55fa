"""``timm-sadistill viz --teacher NAME --model NAME [--checkpoint P] IMAGE... -o maps.png``: attention-map picture.

Builds the task of the loss whose maps are drawn (`drawn_loss`: SA) for a student and a teacher, loads the student
(and its connectors) from a ``train`` checkpoint, and draws, for each image, the teacher's and the student's spatial
attention maps at every distilled stage with the per-image SA stage loss. The teacher needs no weights here: without ``--teacher-checkpoint`` it is random.
"""
import argparse
import logging
import os
import sys
from typing import Optional

import torch

from ..attention_maps import load_images, load_student_checkpoint
from ..losses import default_distill_loss, list_distill_losses
from ..model_folder import resolve_model_name
from ..tasks.teacher import check_teacher_weights
from ..tasks.factory import create_distill_task
from ._common import check_device, check_img_size, create_model, run_command
from ._parser import OneLineArgumentParser, check_finite_floats
from ..training.run_folder import check_output_path
from .distill_flags import add_loss_arguments, add_stage_arguments, join_stage_values, loss_flag_options

__all__ = ['main', 'drawn_loss']

PROG = 'timm-sadistill viz'

_logger = logging.getLogger(__name__)


def drawn_loss() -> str:
    """The loss whose attention maps the picture draws: the default loss where it draws them
    (`DistillLoss.draws_attention_maps`), else the first registered one that does."""
    drawn = list_distill_losses(lambda cls: cls.draws_attention_maps)
    return default_distill_loss() if default_distill_loss() in drawn else drawn[0]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files, one row of the picture each')
    parser.add_argument('-o', '--output', default='attention_maps.png', metavar='PNG',
                        help='picture to write (default: attention_maps.png)')
    parser.add_argument('--model', required=True, metavar='NAME', help='student model name (timm), or local-dir:FOLDER')
    parser.add_argument('--checkpoint', default=None, metavar='FILE',
                        help="the student from a train run: last.pth.tar (with connectors) or model.safetensors")
    parser.add_argument('--teacher', required=True, metavar='NAME',
                        help='teacher model name (timm), or local-dir:FOLDER (its weights included)')
    parser.add_argument('--teacher-checkpoint', default=None, metavar='FILE',
                        help='teacher weights (.safetensors or timm .pth); without it the teacher is random')
    parser.add_argument('--num-classes', type=int, default=None, metavar='N',
                        help='classes of the student (and teacher), as in training')
    parser.add_argument('--img-size', type=int, default=None, metavar='N',
                        help="input size N x N (default: the student's pretrained_cfg input size)")
    add_stage_arguments(parser)
    add_loss_arguments(parser, [drawn_loss()])  # as trained: the connector and the weights shown in the titles
    parser.add_argument('--device', default='cpu', help='device to run the models on (default: cpu)')
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ..attention_maps import picture_path, require_matplotlib, save_attention_maps
    require_matplotlib()  # fail before building models when the picture cannot be drawn
    check_finite_floats(parser, args)
    check_device('--device', args.device)
    output = picture_path(args.output, option='-o/--output')
    check_output_path(os.path.dirname(os.path.abspath(output)), flag='-o/--output')

    device = torch.device(args.device)
    source = check_teacher_weights(args.teacher, args.teacher_checkpoint, pretrained=False, name_option='--teacher',
                                   path_option='--teacher-checkpoint FILE', hub_option='a model folder') \
        if args.teacher_checkpoint else resolve_model_name(args.teacher, '--teacher')
    num_classes = args.num_classes or source.num_classes  # a teacher folder knows the classes
    class_kwargs = {} if num_classes is None else {'num_classes': num_classes}
    img_size = check_img_size(args.img_size)  # a ViT is built for the size of the pictures
    student = create_model(args.model, img_size=img_size, option='--model', **class_kwargs)
    if args.teacher_checkpoint or source.has_weights:
        teacher = args.teacher  # resolve_teacher builds it with the student's classes and loads its weights
    else:
        teacher = create_model(args.teacher, img_size=img_size, num_classes=student.num_classes,
                               in_chans=getattr(student, 'in_chans', 3))
        _logger.warning(f"No --teacher-checkpoint: the teacher '{args.teacher}' has random weights, so its maps show "
                        "an untrained network.")
    task = create_distill_task(
        drawn_loss(), student, teacher, teacher_pretrained_path=args.teacher_checkpoint, teacher_pretrained=False,
        student_stages=args.distill_stages, teacher_stages=args.teacher_stages, img_size=args.img_size,
        device=device, verbose=False, **loss_flag_options(args, drawn_loss()),
    )
    if args.checkpoint:
        load_student_checkpoint(task, args.checkpoint)
    else:
        _logger.warning("No --checkpoint: the student and its connectors have random weights.")
    images = load_images(args.images, student, args.img_size)
    path = save_attention_maps(task, images, output, max_images=None,
                               titles=[os.path.basename(p) for p in args.images])
    print(f"wrote {path}")
    return 0


def main(argv: Optional[list] = None) -> int:
    """Write the attention-map picture; 0 on success, 2 on a user error."""
    parser = build_parser()
    args = parser.parse_args(join_stage_values(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    return run_command(PROG, lambda: _run(parser, args))


if __name__ == '__main__':
    sys.exit(main())
