"""Our model against transformers' reference implementation, float32, through the paged cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.kernels import get_ops
from slimlm.model.layers import AttentionMetadata
from slimlm.model.loader import load_model
from tests.conftest import ARCHS


def paged_logits(model, token_ids: list[int], chunks: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits of one sequence fed in ``chunks`` (prefill pieces / decodes) through a shuffled paged cache."""
    cfg = model.config
    num_blocks = 64
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(num_blocks, generator=gen)[: (len(token_ids) + block_size - 1) // block_size]
    caches = [
        (
            torch.zeros(num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim),
            torch.zeros(num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim),
        )
        for _ in range(cfg.num_layers)
    ]
    out, done = [], 0
    for n in chunks:
        pos = torch.arange(done, done + n)
        meta = AttentionMetadata(
            slot_mapping=table[pos // block_size] * block_size + pos % block_size,
            block_tables=table.to(torch.int32).unsqueeze(0),
            seq_lens=torch.tensor([done + n], dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        )
        with torch.no_grad():
            hidden = model(torch.tensor(token_ids[done : done + n]), pos, meta, caches)
            out.append(model.compute_logits(hidden))
        done += n
    return torch.cat(out)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_logits_match_transformers(hf_checkpoints, arch, kernels):
    path = hf_checkpoints[arch]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(path, dtype="float32", kernels=kernels, load_tokenizer_files=False).model
    ids = torch.randint(0, ref.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    # A 9-token prefill, a 6-token chunk that starts mid-sequence, then five single-token decodes.
    got = paged_logits(ours, ids, [9, 6, 1, 1, 1, 1, 1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    dense = ours.forward_dense(torch.tensor([ids]))[0]  # autograd on: torch's linears
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the model's kernels
        dense = ours.forward_dense(torch.tensor([ids]))[0]
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama-gqa-tied", "qwen3-qknorm"])
def test_dense_forward_takes_the_model_kernels_unless_autograd_needs_torch(hf_checkpoints, arch):
    import dataclasses

    model = load_model(hf_checkpoints[arch], dtype="float32", kernels="torch", load_tokenizer_files=False).model
    calls = []

    def recording_linear(x, weight, bias):
        calls.append(tuple(weight.shape))
        return torch.nn.functional.linear(x, weight, bias)

    ops = dataclasses.replace(model.ops, linear=recording_linear)
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        got = model.forward_dense(ids)
    # Four linears per layer and the output projection (the tied embedding or the lm_head).
    assert len(calls) == 4 * model.config.num_layers + 1
    assert calls[-1] == (model.config.vocab_size, model.config.hidden_size)
    calls.clear()
    model.requires_grad_(True)  # training: torch's path, so autograd sees the products
    expected = model.forward_dense(ids)
    assert calls == []
    expected.sum().backward()
    assert model.layers[0].self_attn.qkv_proj.weight.grad is not None
    torch.testing.assert_close(got, expected.detach())


def test_ops_backend_names():
    assert get_ops("cpu", "torch").name == "torch"
