"""lm_head + cross-entropy in chunks of tokens: the full (tokens x vocab) logits never exist at once.

For a 128,256-word vocabulary the logits of 4,096 tokens are 1 GiB in bf16 and 2 GiB more in fp32 for the loss.
Here each chunk's logits are made, turned into its loss and its gradient w.r.t. the hidden states right away
(the loss is a scalar, so backward only rescales what forward computed), then dropped.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from fastload.engine.cuda_graphs import graphs_of
from fastload.engine.triton.cross_entropy import cross_entropy_in_place
from fastload.engine.triton.launch import triton_runs_on
from fastload.model_state import is_patched, mark_patched
from fastload.structure import is_plain_linear

IGNORE_INDEX = -100
KERNEL_DTYPES = ("bfloat16", "float16")  # fp32 runs use the torch path: its tolerances are fp32 round-off
CHUNK_BYTES = 256 << 20  # transient memory of one chunk's logits (and, on the torch path, their fp32 copies)
TORCH_BYTES_PER_LOGIT = 8  # torch path: bf16 logits, their fp32 copy, bf16 probabilities
KERNEL_BYTES_PER_LOGIT = 2  # Triton path (CUDA): the bf16 logits alone, overwritten by their gradient
GRAPHED_CHUNK_SHRINK = 4  # chunks a quarter the size when the loss replays as a CUDA graph (256 tokens on Llama-3)


def chunk_tokens(vocab: int, bytes_per_logit: int = TORCH_BYTES_PER_LOGIT) -> int:
    """Tokens per chunk: a power of two in [128, 4096] whose chunk stays within CHUNK_BYTES.

    Llama-3's 128,256 words give 256 tokens on the torch path and 1,024 with the Triton kernel (256 when the loss
    may replay as a CUDA graph): larger torch chunks cost more memory than they save time, smaller ones starve the
    lm_head matmuls, and the kernel's 2 bytes a logit buys 1,024 tokens in the memory of 256. liger-kernel's fused
    loss was slower (tiny chunks, a host synchronization each). Measurements: benchmarks/README.md.
    """
    fits = max(1, CHUNK_BYTES // (bytes_per_logit * max(vocab, 1)))
    return min(4096, max(128, 1 << (fits.bit_length() - 1)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk, use_kernel, graphs=None, bias=None):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        replayed = None
        if graphs is not None and use_kernel and grad_hidden is not None:
            # a pure function of (hidden, labels): replayed in the layers' memory pool, its logits chunks
            # take no memory of their own
            replayed = graphs.pure("loss", functools.partial(_loss_and_grad, weight=weight, chunk=chunk, bias=bias),
                                   (hidden, labels), extra=(weight.data_ptr(), tuple(weight.shape), chunk,
                                                            None if bias is None else bias.data_ptr()))
        if replayed is not None:
            total, grad_hidden = replayed
        elif use_kernel:
            total = _kernel_chunks(hidden, weight, labels, chunk, grad_hidden, bias)
        else:
            total = _torch_chunks(hidden, weight, labels, chunk, grad_hidden, bias)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        ctx.divisor = divisor
        ctx.has_grad = grad_hidden is not None
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        if not ctx.has_grad:
            return (None,) * 8
        return (grad_hidden * (grad_out / ctx.divisor).to(grad_hidden.dtype),) + (None,) * 7


def _logits(h, weight, bias):
    """h @ weight.T (+ bias): a head's bias moves the logits, never their gradient w.r.t. the hidden states."""
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


def _torch_chunks(hidden, weight, labels, chunk, grad_hidden, bias=None):
    """Summed loss; grad_hidden (if given) filled with d(sum)/d(hidden). Any device, any float dtype."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; float64 stays float64
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        y = labels[start:start + chunk]
        logits = _logits(h, weight, bias).to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        valid = y != IGNORE_INDEX
        target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
        total += ((lse - target) * valid).sum()
        if grad_hidden is not None:
            # d(loss)/d(logits) = softmax - onehot, on valid rows only; reuse the logits buffer
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1
            probs *= valid.unsqueeze(1)
            grad_hidden[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
    return total


def _kernel_chunks(hidden, weight, labels, chunk, grad_hidden, bias=None):
    """As _torch_chunks, with the Triton kernel turning each chunk's logits into their gradient in place."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    labels = labels.contiguous()
    for start in range(0, hidden.shape[0], chunk):
        logits = _logits(hidden[start:start + chunk], weight, bias)
        cross_entropy_in_place(logits, labels[start:start + chunk], losses[start:start + chunk],
                               IGNORE_INDEX, write_grad=grad_hidden is not None)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:start + chunk])
    return losses.sum()


def _loss_and_grad(hidden, labels, weight, chunk, bias=None):
    grad_hidden = torch.empty_like(hidden)
    return _kernel_chunks(hidden, weight, labels, chunk, grad_hidden, bias), grad_hidden


def chunked_linear_cross_entropy(hidden, weight, labels, num_items: int | None = None, chunk: int | None = None,
                                 graphs=None, bias=None):
    """Mean cross-entropy of (hidden @ weight.T + bias) against labels (-100 ignored); `weight` and `bias` must be
    frozen.

    On CUDA with triton, in bf16/fp16, each chunk goes through one Triton kernel (fastload.engine.triton.cross_entropy);
    with `graphs` (the model's cuda_graphs.ModelGraphs) the chunks replay as one CUDA graph once shapes repeat."""
    use_kernel = (triton_runs_on(hidden) and str(hidden.dtype).removeprefix("torch.") in KERNEL_DTYPES
                  and weight.dtype == hidden.dtype and hidden.is_contiguous()
                  and (bias is None or bias.dtype == hidden.dtype))
    if chunk is None and graphs is not None and not graphs.disabled and use_kernel:
        # replayed as a graph, a chunk costs no launches from the host: smaller chunks keep the graphs' shared
        # memory pool (which must fit the largest chunk's logits) small
        chunk = chunk_tokens(weight.shape[0], KERNEL_BYTES_PER_LOGIT * GRAPHED_CHUNK_SHRINK)
    chunk = chunk or chunk_tokens(weight.shape[0], KERNEL_BYTES_PER_LOGIT if use_kernel else TORCH_BYTES_PER_LOGIT)
    divisor = num_items if num_items is not None else int((labels != IGNORE_INDEX).sum().item())
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, max(int(divisor), 1), chunk, use_kernel, graphs,
                                           bias)


# families whose decoder is not at .model but at the class's base_model_prefix (.transformer, .gpt_neox, .backbone,
# .rwkv), and whose forward applies the output head straight to its last hidden state: each held to the plain
# path's loss in the family matrix (tests/train/test_families.py)
DECODER_ELSEWHERE = frozenset({"gpt2", "gpt_bigcode", "bloom", "falcon", "mpt", "gpt_neox", "gptj", "codegen", "mamba",
                               "falcon_mamba", "rwkv"})
NO_MASK = frozenset({"rwkv"})  # its own forward never hands the decoder an attention mask (the decoder warns if given)


def decoder_of(model):
    """The module whose last hidden state the output head reads, or None where the fused loss cannot tell."""
    if hasattr(model, "model"):
        return model.model
    if model.config.model_type in DECODER_ELSEWHERE:
        return getattr(model, getattr(model, "base_model_prefix", ""), None)
    return None


def head_of(model):
    """The output head: lm_head, or (decoder elsewhere) the model's output embeddings when they are its own child
    (RWKV's head)."""
    head = getattr(model, "lm_head", None)
    if head is None and model.config.model_type in DECODER_ELSEWHERE and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        head = head if any(child is head for child in model.children()) else None
    return head


def supports_fused_loss(model) -> bool:
    """Plain lm_head over the decoder's last hidden state, nothing applied to the logits in between."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = head_of(model)
    if head is None or decoder_of(model) is None or not is_plain_linear(head):
        return False
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return False  # trained lm_head (modules_to_save): let transformers compute its gradient
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text, attr, None) not in (None, 1, 1.0):
            return False
    return not getattr(text, "output_router_logits", False)  # MoE load-balancing loss: transformers adds it


def install_fused_loss(model) -> bool:
    """Give this instance a forward that, when training with labels, returns the loss and no logits (the decoder's
    hidden states and attentions still come back when asked for; return_dict=False takes the plain path)."""
    if not supports_fused_loss(model) or is_patched(model, model, "fused_loss"):
        return False
    original = model.forward

    # the KV cache (past_key_values, or cache in newer transformers) stays in kwargs: naming it here would pass a
    # None that transformers reads as the deprecated name being used
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        # lm_head trained since, or tuples asked for (whose second item callers read as the logits): plain
        if (labels is None or not self.training or not supports_fused_loss(self)
                or kwargs.get("return_dict") is False):
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        given = dict(input_ids=input_ids, attention_mask=None if self.config.model_type in NO_MASK else attention_mask,
                     position_ids=position_ids, inputs_embeds=inputs_embeds)
        decoder = decoder_of(self)
        out = decoder(**{k: v for k, v in given.items() if v is not None}, **_no_cache(type(decoder)), **kwargs)
        hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        shifted = labels[:, 1:].reshape(-1).to(hidden.device)
        if hasattr(num_items, "item"):
            num_items = num_items.item()
        head = head_of(self)
        weight, bias = head.weight, head.bias
        # a head kept in another dtype (HY-V4's fp32 lm_head under a bf16 decoder) gets its input cast to it, as the
        # model's own forward does before lm_head
        hidden = hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype)
        loss = chunked_linear_cross_entropy(hidden, weight, shifted, num_items, graphs=graphs_of(self),
                                            bias=None if bias is None else bias.to(weight.dtype))
        # no cache (training, use_cache=False); hidden states and attentions when asked for, as transformers gives
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    model.forward = types.MethodType(forward, model)
    mark_patched(model, model, "fused_loss")
    return True


@functools.cache
def _no_cache(decoder_class) -> dict:
    """use_cache=False for a decoder that takes it (every one at .model does; of the others, not all)."""
    params = inspect.signature(decoder_class.forward).parameters
    takes = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}
