"""xFormers memory-efficient attention as `attn_implementation="xformers"`.

Registered under a new name with transformers' AttentionInterface (its extension point), so no existing
implementation changes: only models loaded with attn_implementation="xformers" use it.
"""

from __future__ import annotations

import importlib.util

import torch

from fastload.errors import BackendUnavailable

NAME = "xformers"


def register_xformers_attention() -> str:
    """Register the function (idempotent) and return the name to pass as attn_implementation."""
    if importlib.util.find_spec("xformers") is None:
        raise BackendUnavailable("attn_implementation='xformers' was asked for", found="xformers is not installed",
                                 fix="pip install 'fastload[xformers]' (matching your torch), "
                                     "or leave attn_implementation unset")
    if not torch.cuda.is_available():
        raise BackendUnavailable("attn_implementation='xformers' was asked for",
                                 found="xformers' kernels need a CUDA GPU and torch sees none",
                                 fix="leave attn_implementation unset (default) on the CPU")
    _check_kernels_load()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, xformers_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean masks, or None when plain causal suffices
    return NAME


def _check_kernels_load() -> None:
    """xformers wheels are built for one torch release; with another its CUDA kernels do not load."""
    import xformers
    import xformers.ops as xops

    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    try:
        xops.memory_efficient_attention(q, q, q)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        raise BackendUnavailable("attn_implementation='xformers' was asked for",
                                 found=f"xformers {xformers.__version__} cannot run its kernels with torch "
                                       f"{torch.__version__}: {str(e).splitlines()[0][:200]}",
                                 fix="install the xformers build made for this torch, "
                                     "or leave attn_implementation unset") from e


def _bias_from_mask(mask, heads: int, dtype):
    """Boolean (batch, 1, q, kv) mask -> additive bias (batch, heads, q, kv) on 8-aligned storage, as xformers needs."""
    batch, _, q_len, kv_len = mask.shape
    aligned = (kv_len + 7) // 8 * 8
    bias = torch.zeros(batch, heads, q_len, aligned, dtype=dtype, device=mask.device)[..., :kv_len]
    # finfo.min, not -inf: a fully masked (padding) row must give zeros, not NaN
    bias.masked_fill_(~mask.expand(batch, heads, q_len, kv_len), torch.finfo(dtype).min)
    return bias


def xformers_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query/key/value (batch, heads, seq, head_dim) -> output (batch, seq, heads, head_dim), no weights."""
    import xformers.ops as xops

    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query heads: share each key/value head across its group of query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    q_len, kv_len = q.shape[1], k.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        if attention_mask.dtype != __import__("torch").bool:
            attention_mask = attention_mask == 0 if attention_mask.dtype.is_floating_point else attention_mask.bool()
        bias = _bias_from_mask(attention_mask, q.shape[2], q.dtype)
    elif causal and q_len > 1:
        bias = (xops.LowerTriangularMask() if q_len == kv_len
                else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask())
    else:
        bias = None
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout if module.training else 0.0, scale=scaling)
    return out, None
