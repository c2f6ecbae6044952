"""Compile the serving Triton kernels for an H100 (sm_90) on a machine without a GPU.

    python scripts/sm90_compile_check.py

Triton compiles for a named target without a device (``triton.compile`` of an ``ASTSource`` with
``GPUTarget("cuda", 90, 32)``), so a kernel that would not build on the GPU, or that asks for more
shared memory than an H100 has (227 KB a block), shows here before a GPU is lent. Each kernel is
compiled for the pointer dtypes and tile sizes it runs with; the script prints the shared memory
each build needs and fails when one does not build or does not fit. Values are not checked (the
CPU tests run the kernels in Triton's interpreter); the GPU has its own Triton version, which may
differ from this machine's.
"""

from __future__ import annotations

import sys

H100_SHARED_BYTES = 232448  # per block, opt-in maximum


def compile_for_sm90(kernel, pointers: dict[str, str], constexprs: dict[str, object], num_warps: int = 4):
    """The compiled kernel: every parameter not in ``pointers`` or ``constexprs`` is an int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in names}
    source = ASTSource(kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def cases():
    """(label, kernel, pointer dtypes, constexprs, warps) of each build to check."""
    from lorakit.kernels import triton_bgmv, triton_slot_mlp

    for dtype in ("bf16", "fp16", "fp32"):
        ptr = f"*{dtype}"
        for rank in (16, 64):
            rows = dict(G=ptr, U=ptr, H=ptr, BG=ptr, BU=ptr, AD=ptr, ROW_SLOTS="*i64", ACT=ptr, HD="*fp32")
            tiles = dict(BM=triton_slot_mlp.BLOCK_M, BN=triton_slot_mlp.BLOCK_N, BRG=rank, BRU=rank, BRD=rank)
            precision = "ieee" if dtype == "fp32" else "tf32"
            yield (
                f"slot MLP rows {dtype} r{rank}",
                triton_slot_mlp._gate_product_kernel,
                rows,
                {**tiles, "PRECISION": precision},
                triton_slot_mlp.NUM_WARPS,
            )
            tokens = {**rows, "H": "*fp32", "SLOTS": "*i64"}
            tiles = dict(SPLIT=5, BN=triton_slot_mlp.TOKEN_BLOCK_N, BRG=rank, BRU=rank, BRD=rank)
            yield f"slot MLP tokens {dtype} r{rank}", triton_slot_mlp._token_gate_product_kernel, tokens, tiles, 4
            bgmv = dict(X=ptr, SLOTS="*i64", H="*fp32", A0=ptr, A1=ptr, A2=ptr, B0=ptr, B1=ptr, B2=ptr)
            bgmv.update(OUT0=ptr, OUT1=ptr, OUT2=ptr, GM1="*fp32", BIAS=ptr)
            yield (
                f"bgmv shrink {dtype} r{rank}",
                triton_bgmv._shrink_kernel,
                bgmv,
                dict(BR=rank, BK=triton_bgmv.BLOCK_K),
                4,
            )
            expand = dict(SPLIT=2, BR=rank, BN=triton_bgmv.BLOCK_N, HAS_DORA=True, HAS_BIAS=True)
            yield f"bgmv expand {dtype} r{rank}", triton_bgmv._expand_kernel, bgmv, expand, 4


def main() -> int:
    try:
        import triton  # noqa: F401
    except ImportError:
        print("Triton is not installed")
        return 1
    failed = 0
    for label, kernel, pointers, constexprs, warps in cases():
        try:
            compiled = compile_for_sm90(kernel, pointers, constexprs, warps)
        except Exception as exc:  # a kernel that does not build: the message says where
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:500]}")
            failed += 1
            continue
        shared = compiled.metadata.shared
        fits = shared <= H100_SHARED_BYTES
        failed += not fits
        print(f"{'ok' if fits else 'FAIL'} {label}: {shared} bytes of shared memory")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
