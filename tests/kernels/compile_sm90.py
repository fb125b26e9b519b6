"""Compile every kernel for an sm_90 target with no GPU present: ``python compile_sm90.py``.

Run by ``test_compile_sm90.py`` in a fresh process, because the Triton interpreter
(which the other kernel tests use on CPU) patches ``triton.language`` in its own process.
"""

from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KV = "*bf16"
CASES = {
    "store_kv": (
        "engine.kernels.store_kv:_store_kv_kernel",
        {"key_ptr": KV, "value_ptr": KV, "k_cache_ptr": KV, "v_cache_ptr": KV,
         "slot_mapping_ptr": "*i64"},
        {"BLOCK_SIZE": 16, "BLOCK_H": 8, "BLOCK_D": 128},
    ),
    "decode_split": (
        "engine.kernels.paged_decode_attention:_decode_split_kernel",
        {"q_ptr": KV, "k_cache_ptr": KV, "v_cache_ptr": KV, "block_tables_ptr": "*i32",
         "seq_lens_ptr": "*i32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
         "part_acc_ptr": "*fp32"},
        {"NUM_HEADS": 32, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128,
         "HAS_WINDOW": True, "UPCAST": False, "PRECISION": "tf32"},
    ),
    "decode_reduce": (
        "engine.kernels.paged_decode_attention:_decode_reduce_kernel",
        {"out_ptr": KV, "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"},
        {"NUM_HEADS": 32, "BLOCK_S": 64, "BLOCK_D": 128},
    ),
    "prefill": (
        "engine.kernels.paged_prefill_attention:_prefill_kernel",
        {"q_ptr": KV, "out_ptr": KV, "k_cache_ptr": KV, "v_cache_ptr": KV,
         "query_start_loc_ptr": "*i32", "context_lens_ptr": "*i32", "block_tables_ptr": "*i32"},
        {"BLOCK_SIZE": 16, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128,
         "HAS_WINDOW": True, "UPCAST": False, "PRECISION": "tf32"},
    ),
}  # fmt: skip


def compile_case(name: str) -> None:
    import importlib

    target, pointers, constexprs = CASES[name]
    module, attr = target.split(":")
    fn = getattr(importlib.import_module(module), attr)
    assert isinstance(fn, triton.JITFunction), f"{target} was imported interpreted"
    signature = {
        arg: "constexpr"
        if arg in constexprs
        else pointers.get(arg, "fp32" if arg == "qk_scale" else "i32")
        for arg in fn.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)
    )
    assert compiled.asm["cubin"], f"{name}: no cubin"
    print(f"{name}: ok ({compiled.metadata.shared} B shared)")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this script checks the real compiler")
    for case in sys.argv[1:] or CASES:
        compile_case(case)
