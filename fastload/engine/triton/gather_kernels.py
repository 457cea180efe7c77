"""The Triton kernel behind fastload.engine.triton.gather (imported at the first launch: it imports triton)."""

import triton
import triton.language as tl


@triton.jit
def gather_rows(table_ptr, ids_ptr, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    """out[i] = table[ids[i]], one program per id, in BLOCK-wide vector loads; an id outside the table reads nothing
    (its row is left zero: the caller's check reports it)."""
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(ids_ptr + row).to(tl.int64)
    readable = tl.where((token >= 0) & (token < n_rows), n_cols, 0)  # columns to read from this id's row
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        values = tl.load(table_ptr + token * n_cols + cols, mask=cols < readable, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, values, mask=cols < n_cols)
