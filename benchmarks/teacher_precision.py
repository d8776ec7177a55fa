"""The frozen teacher's forward in other precisions and layouts: time per batch, and agreement with fp32.

    python benchmarks/teacher_precision.py --out teacher.md                       # GPU: resnet50, 224 px, batch 128
    python benchmarks/teacher_precision.py --model test_resnet --img-size 32 --batch-size 8 --num-classes 10 \\
        --iters 3                                                                 # CPU smoke run

Every distillation step runs the teacher's forward, and it is the largest cost of every method (2.5x a plain
step on the CPU, benchmarks/results/overhead-cpu.md), so a cheaper teacher forward pays off in every method. The
variants below run one copy each of the same teacher, in eval mode under ``torch.no_grad`` as `DistillTask`
runs it; each returns the final feature map (``forward_features``) and the logits:

    fp32 (TF32 off)              the reference the others are compared with
    fp32, TF32                   PyTorch's default on CUDA: cuDNN convolutions in TF32 (CUDA only)
    fp32, TF32, channels-last    (CUDA only)
    bf16 autocast                what ``--amp --amp-dtype bfloat16`` gives the teacher, and ``--teacher-amp-dtype
                                 bfloat16`` without ``--amp``
    bf16 autocast, channels-last
    fp16 autocast                ``--teacher-amp-dtype float16``
    bf16 weights, channels-last  the teacher cast to bfloat16 once (it is frozen): no per-call weight casts
    bf16 weights, channels-last, compiled   the same under ``torch.compile`` (compiled in the warm-up)

Time: the median of ``--iters`` forwards of one batch after ``--warmup`` (CUDA events on a GPU). Agreement, over
``--eval-batches`` batches against the fp32 reference on the same inputs: top-1 agreement, and the relative L2
error of the logits and of the final feature map (what feature losses read). The weights are random unless
``--checkpoint`` gives trained ones, and the inputs are random images: how many top-1 decisions a rounding
error flips depends on the margins between the top logits, which a random teacher on random images does not
share with a trained one on real images, so take the agreement as indicative and the relative errors as what
carries over.
"""
import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402

from overhead import sync  # noqa: E402

from benchmarks.launch import write_report  # noqa: E402

Forward = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class Variant(NamedTuple):
    """How one copy of the teacher runs."""
    precision: str  # 'fp32' (TF32 off), 'tf32', 'autocast' (bf16), 'autocast-fp16' or 'bf16' (bf16 weights)
    channels_last: bool
    compiled: bool
    cuda_only: bool = False


VARIANTS: Dict[str, Variant] = {
    'fp32 (TF32 off)': Variant('fp32', False, False),
    'fp32, TF32': Variant('tf32', False, False, cuda_only=True),
    'fp32, TF32, channels-last': Variant('tf32', True, False, cuda_only=True),
    'bf16 autocast': Variant('autocast', False, False),
    'bf16 autocast, channels-last': Variant('autocast', True, False),
    'fp16 autocast': Variant('autocast-fp16', False, False),
    'bf16 weights, channels-last': Variant('bf16', True, False),
    'bf16 weights, channels-last, compiled': Variant('bf16', True, True),
}
REFERENCE = 'fp32 (TF32 off)'


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and CUDA matmuls on or off inside the block (no effect on the CPU)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_forward(model: torch.nn.Module, variant: Variant, device: torch.device) -> Forward:
    """x (float32, NCHW) -> (final feature map, logits), both float32, as ``variant`` runs the teacher."""
    model = copy.deepcopy(model).to(device).eval()
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    if variant.precision == 'bf16':
        model.to(torch.bfloat16)
    autocast_dtype = {'autocast': torch.bfloat16, 'autocast-fp16': torch.float16}.get(variant.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext

    def features_and_logits(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = model.forward_features(x)
        return feats, model.forward_head(feats)

    body = torch.compile(features_and_logits) if variant.compiled else features_and_logits
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    dtype = torch.bfloat16 if variant.precision == 'bf16' else torch.float32

    def forward(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), tf32(variant.precision == 'tf32'), autocast():
            feats, logits = body(x.to(dtype, memory_format=layout))
        return feats.float(), logits.float()

    return forward


def time_ms(forward: Forward, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median ms of one forward of ``x`` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        forward(x)
    sync(x.device)
    times = []
    for _ in range(iters):
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            forward(x)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def measure(args: argparse.Namespace, device: torch.device) -> Dict[str, Dict[str, float]]:
    """Per variant: ms per batch, top-1 agreement (%) and the logits' and features' relative errors vs fp32."""
    torch.manual_seed(0)
    overlay = {'pretrained': True, 'pretrained_cfg_overlay': {'file': args.checkpoint}} if args.checkpoint else {}
    model = timm.create_model(args.model, num_classes=args.num_classes, **overlay)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
               for _ in range(args.eval_batches)]
    names = [n for n in args.variants if device.type == 'cuda' or not VARIANTS[n].cuda_only]
    reference = make_forward(model, VARIANTS[REFERENCE], device)
    expected = [reference(x) for x in batches]
    results = {}
    for name in names:
        start = time.perf_counter()
        forward = make_forward(model, VARIANTS[name], device)
        ms = time_ms(forward, batches[0], args.warmup, args.iters)
        outputs = [forward(x) for x in batches]
        agree = sum((logits.argmax(1) == ref_logits.argmax(1)).sum().item()
                    for (_, logits), (_, ref_logits) in zip(outputs, expected))
        results[name] = {
            'ms': ms,
            'top1_agreement': 100.0 * agree / (args.batch_size * len(batches)),
            'logits_error': max(rel_error(o[1], e[1]) for o, e in zip(outputs, expected)),
            'features_error': max(rel_error(o[0], e[0]) for o, e in zip(outputs, expected)),
        }
        print(f'{name}: {results[name]} ({time.perf_counter() - start:.1f} s)', file=sys.stderr, flush=True)
        del forward
    return results


def report(args: argparse.Namespace, device: torch.device, results: Dict[str, Dict[str, float]],
           command: str) -> str:
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} thread(s)'
    weights = f'weights from {args.checkpoint}' if args.checkpoint else 'random weights (see below)'
    base = results[REFERENCE]['ms']
    lines = [f'# Frozen teacher forward: precision and layout ({device.type})', '',
             f'`{args.model}`, {weights}, batch {args.batch_size}, {args.img_size} px, {args.num_classes} classes, '
             f'random inputs; {where}, torch {torch.__version__}, timm {timm.__version__}. Time: median of '
             f'{args.iters} forwards after {args.warmup} warm-up ones. Agreement with {REFERENCE} over '
             f'{args.eval_batches} batches (errors: the largest batch\'s relative L2 error).', '',
             f'Reproduce: `{command}`', '',
             '| variant | ms / batch | speedup vs fp32 | images / s | top-1 agreement (%) | logits rel. error '
             '| features rel. error |', '|---|---:|---:|---:|---:|---:|---:|']
    for name, r in results.items():
        lines.append(f"| {name} | {r['ms']:.2f} | {base / r['ms']:.2f}x | {1000 * args.batch_size / r['ms']:.0f} | "
                     f"{r['top1_agreement']:.1f} | {r['logits_error']:.1e} | {r['features_error']:.1e} |")
    if not args.checkpoint:
        lines += ['', 'Random weights on random images: the top-1 agreement depends on margins a trained teacher on '
                      'real images does not share; the relative errors are what carries over.']
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--checkpoint', default=None, help='trained teacher weights (.safetensors or timm .pth)')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--eval-batches', type=int, default=4, help='batches the agreement is measured on')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--variants', type=lambda s: s.split(';'), default=list(VARIANTS),
                        help=f"';'-separated subset of: {'; '.join(VARIANTS)} (the fp32 reference always runs)")
    parser.add_argument('--threads', type=int, default=1, help='torch threads (CPU)')
    parser.add_argument('--out', help='also write the markdown report to this file')
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        parser.error(f'unknown variants {unknown}; choose from: {"; ".join(VARIANTS)}')
    if REFERENCE not in args.variants:
        args.variants.insert(0, REFERENCE)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = measure(args, device)
    text = report(args, device, results, shlex.join(['python', 'benchmarks/teacher_precision.py', *argv]))
    if args.out:
        write_report(args.out, text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
