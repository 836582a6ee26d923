"""The end-to-end paths: a tiny model, a batch, each path's per-token log-probs, one step.

A path is how one training step turns the model's output into per-token log-probs (PATHS);
everything else (model, batch, loss, AdamW) is the same for every path, so that their
times and peak memory differ only by that choice (docs/benchmarks.md, "bench_e2e").
"""

from __future__ import annotations

import torch

import cpo_fast
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.models import _base
from cpo_fast.pipeline.stages import modeling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# End-to-end paths: name -> what it computes (docs/benchmarks.md, "bench_e2e").
PATHS = {
    "eager": "(a) HF logits, .float().log_softmax(-1).gather(-1, y)",
    "trl-selective": "(b) HF logits, trl selective_log_softmax",
    "trl-fused-head": "(b) trl add_fused_lm_head, model(..., fused_lm_head=True).log_probs",
    "compile": "(c) HF logits, torch.compile(log_softmax + gather)",
    "liger": "(d) backbone hidden, Liger liger_fused_linear_cross_entropy (reduction='none')",
    "cce": "(d) backbone hidden, Cut Cross-Entropy linear_cross_entropy (reduction='none')",
    "cpo_fast": "(e) backbone hidden, cpo_fast fused linear (logits never built; the loss's "
                "coefficients announced, so a trained head's gradient forms in the forward)",
}
GPU_ONLY = ("liger", "cce")  # Triton-GPU-only peers
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(family: str, vocab: int, hidden: int, layers: int, finetune: str, path: str,
                dtype: torch.dtype, device: str, seed: int = 0):
    """A tiny HF causal LM (cpo_fast.pipeline.stages.modeling.build_model), ready to train.

    What the benchmark adds to the shared builder: family 'llama' | 'qwen2' shaped like
    the real ones (untied head; heads of 64 dims, at least 1; grouped-query attention 4:1;
    MLP 3.5 d for Llama, 5.25 d for Qwen2), ``dtype``, and the fine-tuning mode: 'lora'
    (peft, r=16 on every projection: head and embeddings frozen) or 'full' (everything
    trained). TRL's fused head is added before peft wraps the model, as TRL says.
    """
    if family not in ("llama", "qwen2"):
        raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
    if finetune not in ("lora", "full"):
        raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    if hidden % 2:
        raise ValueError(f"--hidden must be even for a rotary-attention model, got {hidden}")
    heads = max(1, hidden // 64)
    while hidden % heads or (hidden // heads) % 2:
        heads -= 1
    kv = max(1, heads // 4)
    while heads % kv:
        kv -= 1
    torch.manual_seed(seed)  # the global generator: peft's LoRA init draws from it too
    model = modeling.build_model(
        family, vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_key_value_heads=kv, max_positions=4096,
        intermediate_size=int((3.5 if family == "llama" else 5.25) * hidden),
        pad_token_id=None, attn_implementation="sdpa", device=device).to(dtype=dtype)
    if path == "trl-fused-head":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    if finetune == "lora":
        import peft

        lcfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=LORA_TARGETS)
        model = peft.get_peft_model(model, lcfg)
    model.train()
    return model


def make_batch(batch: int, seq: int, vocab: int, device: str, seed: int = 1):
    """Random token ids [B, T], an all-ones mask and HF labels (unshifted; the first quarter
    of each row is a prompt, labelled IGNORE_INDEX)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE_INDEX
    return ids, torch.ones_like(ids), labels


def logsoftmax_gather(logits, y):
    """The eager reference: logits.float().log_softmax(-1).gather(-1, y)."""
    return logits.float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def token_logprobs_fn(path: str, model):
    """fn(ids, mask, labels) -> per-token log-probs [B, T-1] for one e2e path (positions
    where labels[:, 1:] == IGNORE_INDEX are not guaranteed to be 0: the loss masks them)."""
    if path in ("eager", "trl-selective", "compile"):
        if path == "eager":
            head = logsoftmax_gather
        elif path == "compile":
            head = torch.compile(logsoftmax_gather, dynamic=False)
        else:
            from trl.trainer.utils import selective_log_softmax as head

        def fn(ids, mask, labels):
            logits = model(input_ids=ids, attention_mask=mask).logits
            return head(logits[:, :-1], labels[:, 1:].clamp(min=0))
        return fn
    if path == "trl-fused-head":
        def fn(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels,
                         fused_lm_head=True).log_probs
        return fn
    if path == "cpo_fast":
        def fn(ids, mask, labels):
            # The loss below is linear in the log-probs, so its coefficients are announced
            # (as the pipeline's SFT and pass 2 do): a trained head forms its gradient in
            # the forward, with no logits recompute.
            keep = (labels[:, 1:] != IGNORE_INDEX).float()
            return cpo_fast.causal_lm_token_logprobs(model, ids, labels, attention_mask=mask,
                                                     grad_coef=-keep / keep.sum().clamp(min=1))
        return fn
    if path in GPU_ONLY:
        return _gpu_peer_fn(path, _base(model))
    raise ValueError(f"unknown path {path!r}; one of {', '.join(PATHS)}")


def _gpu_peer_fn(path: str, base):
    """Liger's or CCE's fused linear cross-entropy on the backbone's hidden states."""
    if path == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def nll(h, w, y):
            return liger_fused_linear_cross_entropy(h, w, y, reduction="none")
    else:
        from cut_cross_entropy import linear_cross_entropy

        def nll(h, w, y):
            return linear_cross_entropy(h, w, y, reduction="none")

    def fn(ids, mask, labels):
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        return -nll(h, base.lm_head.weight, y).float().view(labels.shape[0], -1)
    return fn


def train_step_fn(model, path: str, ids, mask, labels):
    """One training step: loss = -mean log-prob over the labelled tokens, backward, AdamW
    (``fused=True``: one kernel over all parameters, the same for every path)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # the fast kernel, CPU and CUDA
    lp_fn = token_logprobs_fn(path, model)
    keep = labels[:, 1:] != IGNORE_INDEX
    count = keep.sum().clamp(min=1)

    def step():
        lp = lp_fn(ids, mask, labels)
        loss = -(lp * keep).sum() / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def init_state():  # AdamW's state, as after a first step (zero gradients, lr 0)
        for p in params:
            p.grad = torch.zeros_like(p)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)

    step.init_state = init_state
    return step
