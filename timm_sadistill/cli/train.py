"""``timm-sadistill train``: timm's training recipe (flag names and meanings of timm's train.py) with our tasks.

This module is the parser and the entry point: it turns the flags into what the run takes (the teacher, its weights
checked, and the task's keyword arguments); the run itself is `timm_sadistill.training.run.train`.
Distributed: ``torchrun --standalone --nproc_per_node=N -m timm_sadistill train ...``.
"""
import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml
from timm import utils

from ..errors import UsageError
from ..training.export import train_command_line
from ..training import train
from ..training.run import RECORDED_ARGS
from ._parser import OneLineArgumentParser, check_finite_floats
from .distill_flags import (
    add_distill_arguments, check_teacher_flags, distill_task_kwargs, join_stage_values, loss_flag_options,
)
from .timm_flags import NEEDS_TIMM_TRAIN, add_timm_arguments, needs_timm_train_message

__all__ = ['build_parser', 'parse_args', 'main']

CHECK_IMAGES_DEFAULT = 4


def _image_count(value: str) -> Union[int, str]:
    """``--check-images``: a count of images per class (0 or more) or ``all``."""
    if value == 'all':
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a count of images per class or 'all', got '{value}'")
    return int(value)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data-check flags of ``train``."""
    group = parser.add_argument_group('Data checks (timm-sadistill)')
    group.add_argument('--check-images', type=_image_count, default=CHECK_IMAGES_DEFAULT, metavar='N|all',
                       help=f'Images per class decoded before anything is written (default: {CHECK_IMAGES_DEFAULT}; '
                            "'all': every image, split over the ranks). Any other image is decoded when it is read, "
                            'and one that does not decode stops the run with its path.')


def build_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, main parser): the first reads only ``-c/--config``, whose YAML sets the second's defaults."""
    config_parser = OneLineArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')
    parser = OneLineArgumentParser(
        prog='timm-sadistill train', parents=[config_parser], allow_abbrev=False,
        description='Train a timm model, optionally distilling a teacher into it (timm train.py flags).',
    )
    add_timm_arguments(parser)
    add_distill_arguments(parser)
    add_data_arguments(parser)
    group = parser.add_argument_group('Training loop (timm-sadistill)')
    group.add_argument('--skip-nonfinite', action='store_true', default=False,
                       help='Skip a step whose loss is NaN/inf with a warning (default: stop with an error)')
    group.add_argument('--save-attention-maps', action='store_true', default=False,
                       help='After training, save teacher/student attention maps of validation images '
                            '(needs timm_sadistill.viz)')
    return config_parser, parser


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, str]:
    """(args, args as YAML text for args.yaml); ``-c FILE`` sets defaults as in timm's train.py."""
    config_parser, parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(join_stage_values(argv))
    if args_config.config:
        parser.set_defaults(**_read_config(args_config.config, parser))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    check_finite_floats(parser, args)
    loss_flag_options(args, args.distill)  # a loss flag of another method, or a value its option refuses
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}.")
    args_text = yaml.safe_dump({k: v for k, v in vars(args).items()}, default_flow_style=False)
    return args, args_text


def _read_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The defaults a ``-c`` YAML file sets, keyed by destination. Keys are flag names with '_' for '-', as in timm's
    args.yaml (``kd_model_name`` is ``--kd-model-name``); a train.py flag of `NEEDS_TIMM_TRAIN` passes only at
    train.py's default, which timm's args.yaml lists for every flag; what a run records beside its flags
    (`RECORDED_ARGS`) is left out, so a run's args.yaml reads back."""
    if not os.path.isfile(path):
        raise UsageError(f"Config file '{path}' does not exist; pass a YAML file to -c/--config.")
    with open(path) as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, 'problem_mark', None)
            where = f' at line {mark.line + 1}' if mark is not None else ''
            raise UsageError(f"Config file '{path}' is not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                             "fix it or pass another -c file.") from None
    if not isinstance(config, dict):
        raise UsageError(f"Config file '{path}' holds a {type(config).__name__}, not 'flag_name: value' lines; fix it.")
    dests = {}
    for action in parser._actions:
        dests[action.dest] = action.dest
        dests.update({flag.lstrip('-').replace('-', '_'): action.dest for flag in action.option_strings})
    refused = {flag.lstrip('-').replace('-', '_'): (flag, default) for flags, default in NEEDS_TIMM_TRAIN.items()
               for flag in flags}
    defaults, unknown = {}, []
    for key, value in config.items():
        if key in RECORDED_ARGS:
            continue
        if key in refused:
            flag, default = refused[key]
            if value != default:
                raise UsageError(f"Config file '{path}' sets {key}: " + needs_timm_train_message(flag))
        elif key in dests:
            defaults[dests[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise UsageError(f"Config file '{path}' sets unknown options {', '.join(sorted(unknown))}; "
                         "use the flag names with '_' for '-' (e.g. batch_size).")
    return defaults


def main(argv: Optional[List[str]] = None) -> int:
    """``timm-sadistill train ...``; returns the exit status."""
    utils.setup_default_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, args_text = parse_args(argv)
    # without a teacher (or a method), the run refuses the flags with the fix
    teacher = check_teacher_flags(args.teacher, args) if args.distill != 'none' and args.teacher else None
    train(args, args_text, teacher=teacher, task_kwargs=distill_task_kwargs(args),
          command=train_command_line(argv, int(os.environ.get('WORLD_SIZE', 1))))
    return 0
