"""The registry of fused ops: what each Triton file registers, and what the dispatcher, the compile report, the kernel
benchmark and the parametrized tests iterate.

An op is declared by its formula in `reference` (its name, its arguments in order and their defaults, and the bounds
of its scalars, ``Annotated[float, Positive]``); `op_spec` reads that declaration. A Triton file
``ops/<family>_triton.py`` holds the kernels, their launchers, the custom ops with their autograd, and for each op
an entry decorated with ``@register_fused_op(kernels=...)``: a function named like the formula, taking the formula's
arguments plus ``strict`` and returning its outputs. `load_triton_files` imports every such file (the dispatcher
does it once, when triton imports), so a new file needs no edit anywhere else.

Conventions every op keeps, which the dispatcher, the tests and the benchmark rely on: tensor arguments are
(B, C, H, W) feature maps of one shape; the first takes the gradient (the student) and any other is a target (the
teacher) that takes none on the Triton path; an output is a scalar (a batch mean) or has the batch as its first
dimension (a per-sample quantity).
"""
import importlib
import inspect
import pkgutil
import sys
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

__all__ = ['FusedOp', 'OpSpec', 'Positive', 'fused_ops', 'load_triton_files', 'op_spec', 'register_fused_op']


class _Positive:
    """Marks an op's float argument that must be > 0 (a temperature, a power): ``Annotated[float, Positive]``."""

    def __repr__(self) -> str:
        return 'Positive'


Positive = _Positive()


@dataclass(frozen=True)
class OpSpec:
    """An op's declaration, read from its formula: argument names in order, their defaults, which are feature maps
    and which must be > 0."""
    name: str
    names: Tuple[str, ...]
    defaults: Dict[str, Any]
    tensors: Tuple[str, ...]
    positive: Tuple[str, ...]


def op_spec(formula: Callable) -> OpSpec:
    """The `OpSpec` of a formula of `reference` (tensor arguments annotated ``torch.Tensor``)."""
    hints = typing.get_type_hints(formula, include_extras=True)
    params = inspect.signature(formula).parameters.values()
    return OpSpec(
        name=formula.__name__,
        names=tuple(p.name for p in params),
        defaults={p.name: p.default for p in params if p.default is not inspect.Parameter.empty},
        tensors=tuple(p.name for p in params if hints.get(p.name) is torch.Tensor),
        positive=tuple(p.name for p in params if Positive in getattr(hints.get(p.name), '__metadata__', ())),
    )


@dataclass(frozen=True)
class FusedOp:
    """A registered Triton path: ``triton(*the formula's arguments, strict)`` -> the formula's outputs, and the
    names of the ``@triton.jit`` kernels of ``module`` that its launches start (what the compile report compiles)."""
    name: str
    triton: Callable[..., Any]
    module: str
    kernels: Tuple[str, ...]


_FUSED_OPS: Dict[str, FusedOp] = {}


def register_fused_op(kernels: Tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator of a Triton file's entry for the op of the same name; ``kernels``: the file's launched kernels."""
    def register(fn: Callable) -> Callable:
        module = sys.modules[fn.__module__]
        missing = [k for k in kernels if not hasattr(module, k)]
        if missing or fn.__name__ in _FUSED_OPS:
            raise RuntimeError(f'{fn.__module__}.{fn.__name__}: ' + (
                f'no kernel named {", ".join(missing)} above it' if missing else 'the op is registered twice'))
        _FUSED_OPS[fn.__name__] = FusedOp(fn.__name__, fn, fn.__module__, tuple(kernels))
        return fn
    return register


def fused_ops() -> Dict[str, FusedOp]:
    """Name -> `FusedOp` of every op whose Triton file imported (after `load_triton_files`)."""
    return dict(_FUSED_OPS)


def load_triton_files() -> Dict[str, str]:
    """Import every ``<family>_triton`` module of this package, which registers its ops; -> module -> the error of
    each that failed to import. A failure warns once and drops that file's ops: the PyTorch formulas serve them."""
    failed = {}
    for info in pkgutil.iter_modules(sys.modules[__package__].__path__):
        if not info.name.endswith('_triton'):
            continue
        module = f'{__package__}.{info.name}'
        try:
            importlib.import_module(module)
        except Exception as e:  # a triton version without an API the file uses: the rest of the package still works
            for name in [n for n, op in _FUSED_OPS.items() if op.module == module]:
                del _FUSED_OPS[name]
            failed[module] = f'{type(e).__name__}: {e}'
            warnings.warn(f'{module} did not import ({failed[module]}); its ops run the PyTorch formulas.',
                          RuntimeWarning, stacklevel=2)
    return failed
