"""``timm-sadistill stages MODEL [--teacher NAME] [--img-size N] [--distill sa]``: what can be distilled, and how.

Prints the selectable stages of a timm model (name, index into ``feature_info``, channels, reduction, the map size
measured at the input size, and whether ``auto`` may pick it) and, with a teacher, the stage pairs ``auto`` chooses
for the method, the connector each pair gets and, where the two maps differ in size (a patch-14 ViT against a CNN),
the resize of the student's map to the teacher's; for a method whose terms run the heads on their maps (SA's CAM
term), the pair of those maps, which a task distils last, or the notice that says the term is off for this pair.
Models are built with random weights for the input size (a ViT
takes only the size it is built for): nothing downloads.
"""
import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..features import (
    FeatureTaps, StageInfo, check_input_size, default_img_size, head_map_pair, list_stages, pair_stages,
    stage_map_sizes,
)
from ..errors import UsageError
from ..losses import default_distill_loss, get_distill_loss_class, list_distill_losses, load_loss_plugins, loss_options
from ..model_folder import resolve_model_name
from ._common import check_img_size, create_model, run_command

__all__ = ['main', 'connector_description']

PROG = 'timm-sadistill stages'


def connector_description(method: str, student_channels: int, teacher_channels: int) -> str:
    """The connector loss ``method`` builds by default for one pair (its ``connector`` option), e.g.
    ``'bottleneck 192->256'``, or ``'none'``."""
    connector = loss_options(method).options.get('connector')
    if connector is None:
        return 'none'
    return f'{connector.default} {student_channels}->{teacher_channels}'


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [header, *rows]
    return '\n'.join('  '.join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines)


def _hw(size: Tuple[int, int]) -> str:
    return f'{size[0]}x{size[1]}'


def _stage_rows(model: nn.Module, img_size: Tuple[int, int], sizes: Dict[int, Tuple[int, int]]) -> List[Sequence[str]]:
    # The stages 'auto' may pick at this input size: FeatureTaps applies the same rule (reduction >= 4, map >= 4x4).
    try:
        auto = {s.index for s in FeatureTaps(model, 'auto', img_size=img_size).stages}
    except UsageError:  # no stage qualifies at this size: the table still shows what exists
        auto = set()
    return [
        (s.name, str(s.index), str(s.channels), str(s.reduction), _hw(sizes[s.index]), 'yes' if s.index in auto else '')
        for s in list_stages(model)
    ]


def _pair_rows(
        method: str,
        pairs: Tuple[List[StageInfo], List[StageInfo]],
        student_sizes: Dict[int, Tuple[int, int]],
        teacher_sizes: Dict[int, Tuple[int, int]],
) -> List[Sequence[str]]:
    """One row per pair; ``resized`` shows the student map resized to the teacher's (docs/method.md#alignment)."""
    rows = []
    for s, t in zip(*pairs):
        s_map, t_map = student_sizes[s.index], teacher_sizes[t.index]
        reduction = str(t.reduction) if s.reduction == t.reduction else f'{s.reduction}->{t.reduction}'
        resized = f'{_hw(s_map)}->{_hw(t_map)}' if s_map != t_map else ''
        rows.append((f'{s.name} ({s.channels})', f'{t.name} ({t.channels})', reduction, _hw(t_map),
                     connector_description(method, s.channels, t.channels), resized))
    return rows


def build_parser() -> argparse.ArgumentParser:
    load_loss_plugins()  # a package's losses (entry points) are --distill choices too
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', metavar='MODEL', help='timm model name (the student), or local-dir:FOLDER')
    parser.add_argument('--teacher', default=None, metavar='NAME',
                        help='teacher model name (or local-dir:FOLDER): also print the pairing')
    parser.add_argument('--img-size', type=int, default=None, metavar='N',
                        help="input size N x N (default: the model's pretrained_cfg input size)")
    default = default_distill_loss()
    parser.add_argument('--distill', default=default, choices=list_distill_losses(),
                        help=f'method whose auto pairing and connectors are shown (default: {default})')
    return parser


def _run(args: argparse.Namespace) -> int:
    requested = check_img_size(args.img_size)
    model = create_model(args.model, img_size=requested, option='MODEL')
    img_size = requested or default_img_size(model)
    check_input_size(model, img_size, option='--img-size', role=f'model {args.model}')
    teacher = None
    if args.teacher is not None:  # built (and checked) before anything prints: an error is then the only output
        teacher = create_model(args.teacher, img_size=img_size, option='--teacher', num_classes=model.num_classes,
                               in_chans=getattr(model, 'in_chans', 3))
        check_input_size(teacher, img_size, option='--img-size', role=f'teacher {args.teacher}')
    sizes = stage_map_sizes(model, img_size)
    rows = _stage_rows(model, img_size, sizes)
    if not rows:
        print(f"{args.model} has no feature_info: distil submodule paths (see model.named_modules()).")
    else:
        weights = 'its own weights' if resolve_model_name(args.model).has_weights else 'random weights'
        print(f"Stages of {args.model} at {_hw(img_size)} ({weights}):")
        print(_table(('name', 'index', 'channels', 'reduction', 'map', 'auto'), rows))
    if teacher is None:
        return 0

    loss_class = get_distill_loss_class(args.distill)
    policy = loss_class.stage_policy
    if policy == 'none':
        print(f"\n{args.distill} distils logits only: no stage pairs.")
        return 0
    pairs = pair_stages(model, teacher, img_size=img_size, policy=policy)
    print(f"\n{args.distill} pairs chosen by auto (policy '{policy}'), {args.model} -> {args.teacher} at {_hw(img_size)}:")
    rows = _pair_rows(args.distill, pairs, sizes, stage_map_sizes(teacher, img_size))
    print(_table(('student', 'teacher', 'reduction', 'map', 'connector', 'resized'), rows))
    if any(row[-1] for row in rows):
        print("resized: the student's map is resized to the teacher's after its connector (pooled down, bilinear up).")
    if loss_class.uses_final_pair():
        heads, why = head_map_pair(model, teacher, img_size)
        if heads is None:
            print(f"\n{loss_class.without_final_pair(why)[1]}")
        else:
            s, t = heads
            print(f"\nand last, the maps the heads take, for the terms that run the heads on them (no connector): "
                  f"{s.name} ({s.channels}) -> {t.name} ({t.channels})")
    return 0


def main(argv: Optional[list] = None) -> int:
    """Print the stage table (and pairing); 0 on success, 2 on a user error."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _run(args))


if __name__ == '__main__':
    sys.exit(main())
