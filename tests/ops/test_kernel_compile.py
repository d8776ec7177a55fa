"""Every Triton launch the registered ops make compiles for sm_80 and sm_90 without a GPU, spills nothing and stays
within 128 registers a thread (`timm_sadistill.ops.compile_report`: the launches are recorded through the public ops
with the registered kernels swapped for recorders, specialised as Triton's JIT would, compiled by triton and its
ptxas in a subprocess without the interpreter).

The compile of the whole matrix runs once per session; triton's on-disk cache (TRITON_CACHE_DIR, default
~/.triton/cache) makes a rerun take seconds.
"""
import itertools

import pytest

from timm_sadistill.ops import compile_report as kc
from timm_sadistill.ops import dispatch, op_registry

SPECS = dispatch.op_specs()


@pytest.fixture(scope='module')
def rows():
    return kc.compile_report()


@pytest.mark.slow
def test_every_launch_compiles_without_spills_within_the_register_limit(rows):
    assert not kc.problems(rows), '\n'.join(kc.problems(rows))


@pytest.mark.slow
def test_the_report_covers_every_op_dtype_layout_p_shape_and_target(rows):
    covered = {(arch, op, dtype, layout, p, shape) for row in rows
               for arch, op, dtype, layout, p, shape in itertools.product(
                   [row.arch], row.ops, row.dtypes, row.layouts, row.ps, row.shapes)}
    for arch, op, dtype, layout, p, shape in itertools.product(kc.ARCHS, op_registry.fused_ops(), kc.DTYPES,
                                                                kc.LAYOUTS, kc.PS, kc.SHAPES):
        if 'p' not in SPECS[op].names and p != kc.PS[0]:
            continue  # p does not reach the ops without it (spatial_kl)
        assert (arch, op, dtype, layout, p, shape) in covered
    kernels = {(row.kernel, row.arch) for row in rows}
    assert kernels == set(itertools.product(kc.kernels(), kc.ARCHS))


def test_recording_sees_each_ops_forward_and_backward_launches():
    launches = kc.record_launches(shapes={'odd': (3, 5, 7)}, dtypes=('float32',), layouts=('nchw',), ps=(2.0,))
    by_op = {}
    for launch in launches:
        by_op.setdefault(launch.op, []).append(
            (launch.kernel, {k: v for k, v in launch.kwargs.items() if k in ('PAIR', 'DO_ATT', 'DO_KL')}))
    assert by_op['spatial_attention'] == [('_sa_fwd_kernel', {'PAIR': False, 'DO_ATT': True}),
                                          ('_attention_finish_kernel', {'PAIR': False}),
                                          ('_sa_bwd_kernel', {'DO_KL': False, 'DO_ATT': True})]
    assert by_op['spatial_kl'] == [('_sa_fwd_kernel', {'PAIR': True, 'DO_ATT': False}),
                                   ('_sa_bwd_kernel', {'DO_KL': True, 'DO_ATT': False})]
    assert [k for k, _ in by_op['spatial_kl_and_attention']] == [
        '_sa_fwd_kernel', '_attention_finish_kernel', '_sa_bwd_kernel', '_sa_bwd_kernel', '_sa_bwd_kernel']
    # the launch options the kernel layer picked travel with each launch
    assert all({'num_warps', 'BLOCK_N'} <= set(launch.kwargs) for launch in launches)


def test_problems_name_errors_spills_and_register_excess():
    def row(**result):
        return kc.Row('_sa_fwd_kernel', 90, ['spatial_kl'], ['odd sizes'], ['float16'], ['nchw'], [2.0],
                      {'BLOCK_N': 32}, 4, 3, **result)

    found = kc.problems([row(regs=128, spill_bytes=0), row(regs=129, spill_bytes=0), row(regs=96, spill_bytes=8),
                         row(error='CompilationError: boom')])
    assert len(found) == 3
    assert '129 registers > 128' in found[0] and 'spills 8 bytes' in found[1] and 'boom' in found[2]


def test_occupancy_from_registers_warps_and_shared_memory():
    assert kc.occupancy(255, 4, 0, 90) == (2, 8)  # what a 255-register tile leaves an SM
    assert kc.occupancy(128, 4, 0, 90) == (4, 16)
    assert kc.occupancy(64, 4, 0, 80) == (8, 32)
    assert kc.occupancy(32, 4, 0, 80) == (16, 64)  # the 64-warp limit
    assert kc.occupancy(32, 4, 40 * 1024, 80) == (4, 16)  # 164 KiB of shared memory at 41 KiB a block
