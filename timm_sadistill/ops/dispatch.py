"""The public ops and their dispatch: one function per formula of `reference`, taking its arguments plus
``backend='auto' | 'triton' | 'torch'``.

Each public op checks its arguments once, from the formula's declaration (`op_registry.op_spec`: feature maps of
one shape on one device, ``Positive`` scalars > 0), then runs the op's registered Triton path (`op_registry`) or the
formula. ``auto`` picks Triton for CUDA tensors of the kernels' dtypes when triton imports; ``triton`` also runs
CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first imported (how CI checks the kernels), and
raises where Triton cannot run.
"""
import inspect
import os
from typing import Any, Callable, Dict, Sequence, Tuple

import torch

from ..errors import UsageError
from . import op_registry, reference
from .op_registry import OpSpec

__all__ = ['BACKENDS', 'TRITON_DTYPES', 'example_args', 'op_specs', 'public_ops', 'triton_available']

BACKENDS = ('auto', 'triton', 'torch')
# what the Triton kernels read; float64 (gradcheck) stays on the reference
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# read once: a traced step (torch.compile) sees constants, not imports
_TRITON_AVAILABLE = _import_triton()
_TRITON_FAILED = op_registry.load_triton_files() if _TRITON_AVAILABLE else {}
_TRITON_PATHS = {name: op.triton for name, op in op_registry.fused_ops().items()}


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def _is_cuda(x: torch.Tensor) -> bool:
    # auto's device test, one function so that the CPU tests can make auto pick the kernels (in the interpreter)
    return x.is_cuda


def _check_triton_runs(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """Raise why backend='triton' cannot run ``name`` on these tensors: a dtype is the caller's choice (UsageError);
    a missing package, kernel or device is the machine's (RuntimeError)."""
    for y in tensors:
        if y.dtype not in TRITON_DTYPES:
            raise UsageError(f"backend='triton' supports {', '.join(str(d) for d in TRITON_DTYPES)}, got {y.dtype}; "
                             "use backend='torch' for it.")
    if not _TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'.")
    if name not in _TRITON_PATHS:
        failed = '; '.join(f'{m}: {e}' for m, e in _TRITON_FAILED.items()) or 'no Triton file registers it'
        raise RuntimeError(f"backend='triton': {name} has no Triton kernel here ({failed}); use backend='torch'.")
    if not tensors[0].is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise RuntimeError(
            f"backend='triton' got a tensor on {tensors[0].device}; move it to CUDA, or set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels on the CPU, or use backend='torch'.")


def _use_triton(name: str, backend: str, tensors: Sequence[torch.Tensor]) -> bool:
    if backend not in BACKENDS:
        raise UsageError(f"Unknown backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    if backend == 'torch':
        return False
    if backend == 'auto':
        return _is_cuda(tensors[0]) and all(y.dtype in TRITON_DTYPES for y in tensors) and name in _TRITON_PATHS
    _check_triton_runs(name, tensors)
    return True


def _check_features(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise UsageError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise UsageError(f"{name} must be a floating point tensor (float32, float16, bfloat16 or float64), got {x.dtype}.")
    if x.numel() == 0:
        raise UsageError(f"{name} must be non-empty, got shape {tuple(x.shape)}.")


def _check(spec: OpSpec, values: Dict[str, Any]) -> None:
    """The op's declared checks: each feature map, the maps pairwise (shape, device), each Positive scalar."""
    for name in spec.tensors:
        _check_features(name, values[name])
    first, x = spec.tensors[0], values[spec.tensors[0]]
    for name in spec.tensors[1:]:
        y = values[name]
        if y.shape != x.shape:
            raise UsageError(
                f"{first} and {name} must have the same shape, got {first} {tuple(x.shape)} and {name} "
                f"{tuple(y.shape)}; project and resize the student features to the teacher's (a connector) first.")
        if y.device != x.device:
            raise UsageError(f"{first} and {name} must be on the same device, got {first} on {x.device} and {name} "
                             f"on {y.device}.")
    for name in spec.positive:
        if not values[name] > 0:
            raise UsageError(f"{name} must be > 0, got {values[name]}.")


def _bind(spec: OpSpec, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments by name in the formula's order, then backend; plain lookups that a traced step follows."""
    names = spec.names + ('backend',)
    if len(args) > len(names):
        raise TypeError(f'{spec.name}() takes at most {len(names)} arguments ({len(args)} given)')
    values = dict(zip(names, args))
    for name in names[len(args):]:
        if name in kwargs:
            values[name] = kwargs.pop(name)
        elif name == 'backend':
            values[name] = 'auto'
        elif name in spec.defaults:
            values[name] = spec.defaults[name]
        else:
            raise TypeError(f"{spec.name}() missing the argument '{name}'")
    if kwargs:
        name = next(iter(kwargs))
        raise TypeError(f"{spec.name}() got " + (f"multiple values for the argument '{name}'" if name in names else
                                                 f"an unexpected argument '{name}'"))
    return values


_BACKEND_DOC = """
backend: 'auto' (the fused Triton kernels for CUDA tensors of float32, float16 or bfloat16 when triton imports,
    behind a first-use check against these formulas; else the formulas), 'triton' (always the kernels; raises
    where they cannot run) or 'torch' (the formulas). On the Triton path only the first feature map takes a
    gradient and every output is float32."""


def _public_op(formula: Callable) -> Callable:
    """The op of ``formula``: its arguments (then backend) bound and checked, then its Triton path or itself."""
    spec = op_registry.op_spec(formula)

    def op(*args, **kwargs):
        values = _bind(spec, args, kwargs)
        backend = values.pop('backend')
        _check(spec, values)
        if _use_triton(spec.name, backend, [values[name] for name in spec.tensors]):
            return _TRITON_PATHS[spec.name](*values.values(), strict=backend == 'triton')
        return formula(*values.values())

    signature = inspect.signature(formula)
    backend = inspect.Parameter('backend', inspect.Parameter.POSITIONAL_OR_KEYWORD, default='auto', annotation=str)
    op.__signature__ = signature.replace(parameters=[*signature.parameters.values(), backend])
    op.__name__ = op.__qualname__ = spec.name
    op.__module__ = 'timm_sadistill.ops'
    op.__doc__ = (formula.__doc__ or '') + '\n' + _BACKEND_DOC
    return op


def public_ops() -> Dict[str, Callable]:
    """Name -> public op, one per formula in ``reference.__all__``."""
    return {name: _public_op(getattr(reference, name)) for name in reference.__all__}


def op_specs() -> Dict[str, OpSpec]:
    """Name -> `OpSpec` of every op (the tests and benchmarks build their arguments from it)."""
    return {name: op_registry.op_spec(getattr(reference, name)) for name in reference.__all__}


def example_args(spec: OpSpec, tensors: Sequence[torch.Tensor], **scalars: Any) -> Tuple[Any, ...]:
    """The op's positional arguments: ``tensors`` for its feature maps in order, ``scalars`` or the defaults."""
    maps = dict(zip(spec.tensors, tensors))
    return tuple(maps[n] if n in maps else scalars.get(n, spec.defaults.get(n)) for n in spec.names)
