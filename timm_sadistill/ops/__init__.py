"""Spatial ops (the attention map of AT and SA, the spatial KL of CWD and SA, both at once for SA) with fused Triton
kernels and the plain PyTorch formulas as fallback.

Every op takes ``backend='auto' | 'triton' | 'torch'``. ``auto`` runs the Triton kernels for CUDA tensors when
triton imports and PyTorch otherwise; ``triton`` also runs CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was first imported (that is how CI checks the kernels).

Layout (docs/kernels.md): `reference` declares each op by its PyTorch formula (the test oracle); a Triton file per
op family (`spatial_triton`: kernels, launchers, ``torch.library`` custom ops and their autograd) registers its ops'
Triton paths in `op_registry`; `dispatch` makes one public op per formula, exported here. Under ``auto`` each kernel
variant is checked against the formulas on its first call (`_first_use`): one that fails warns once and falls back;
``triton`` raises instead. `compile_report` compiles every registered kernel launch for a GPU target without a GPU.
"""
from .dispatch import BACKENDS, public_ops, triton_available

# one public op per formula of `reference` (spatial_attention, spatial_kl, spatial_kl_and_attention): a new formula
# with its Triton file is a new op here, with no edit to this file
_PUBLIC_OPS = public_ops()
globals().update(_PUBLIC_OPS)

__all__ = [*_PUBLIC_OPS, 'triton_available', 'BACKENDS']
