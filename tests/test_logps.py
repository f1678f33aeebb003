"""The log-prob paths: the LM head runs only where a response token is predicted (prompts left-padded,
responses right-padded, `logits_to_keep`), log-probs are gather minus logsumexp over chunks, and the
numbers equal the plain full-logits formula; no training step creates a vocabulary-sized fp32 tensor
larger than the kept logits; fused AdamW takes the same step as the per-tensor loop."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dpo
import expo
import ppo
import sft
import var
from conftest import TOY

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def toy():
    tokenizer = dpo.load_tokenizer(str(TOY / "sft"), False)
    model = dpo.load_model(str(TOY / "sft"), False).eval()
    rows = [json.loads(line) for line in open(TOY / "data" / "prefs" / "test.jsonl")][:6]
    pairs = dpo.build_pairs(rows, tokenizer, 1024, [tokenizer.eos_token_id])
    return model, tokenizer, pairs


def full_logits_logps(model, sequences: list, temperature: float = 1.0) -> torch.Tensor:
    """The plain formula, one sequence at a time: every position's logits, a full fp32 log-softmax."""
    out = []
    for prompt, response in sequences:
        ids = torch.tensor([prompt + response])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)
        out.append(sum(logprobs[len(prompt) + t - 1, token] for t, token in enumerate(response)))
    return torch.stack(out)


def test_head_only_logps_equal_the_full_logits_formula(toy):
    model, tok, pairs = toy
    sequences = [(p[s]["input_ids"][: p[s]["labels"].count(-100)], p[s]["input_ids"][p[s]["labels"].count(-100):])
                 for s in ("chosen", "rejected") for p in pairs]
    assert len({len(p) for p, _ in sequences}) > 1 and len({len(r) for _, r in sequences}) > 2  # padded
    with torch.no_grad():
        expected = full_logits_logps(model, sequences)
        assert torch.allclose(dpo.batch_logps(model, dpo.collate_pairs(pairs, tok.pad_token_id), NO_AUTOCAST),
                              expected, atol=1e-5)
        samples = [(p, r, True) for p, r in sequences]
        for script in (var, expo, dpo):  # ppo.py: test_ppo_token_logprobs_equal_the_full_logits_formula
            batch = script.collate_sequences(samples, tok.pad_token_id)
            assert batch["labels"].shape[1] < batch["input_ids"].shape[1]  # the head skips the prompts
            got = script.batch_logps(model, batch, NO_AUTOCAST, temperature=0.7)
            assert torch.allclose(got, full_logits_logps(model, sequences, 0.7), atol=1e-5), script.__name__
        batch = sft.collate([{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in sequences],
                            tok.pad_token_id)
        loss = sft.sft_loss_sum(sft.forward_logits(model, batch, NO_AUTOCAST), batch["labels"])
        assert torch.allclose(loss, -expected.sum(), atol=1e-4)


def test_ppo_token_logprobs_equal_the_full_logits_formula(toy):
    model, tok, pairs = toy
    sequences = [(p["chosen"]["input_ids"][: p["chosen"]["labels"].count(-100)],
                  p["chosen"]["input_ids"][p["chosen"]["labels"].count(-100):]) for p in pairs]
    Q, R = max(len(p) for p, _ in sequences), max(len(r) for _, r in sequences)
    mb = {"query": torch.full((len(pairs), Q), tok.pad_token_id), "query_mask": torch.zeros(len(pairs), Q).long(),
          "response": torch.full((len(pairs), R), tok.pad_token_id), "mask": torch.zeros(len(pairs), R).long()}
    for i, (q, r) in enumerate(sequences):
        mb["query"][i, Q - len(q):], mb["query_mask"][i, Q - len(q):] = torch.tensor(q), 1
        mb["response"][i, : len(r)], mb["mask"][i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        logprobs, entropy = ppo.policy_logprobs(model, mb, 0.7, NO_AUTOCAST, entropy=True)
        assert ppo.policy_logprobs(model, mb, 0.7, NO_AUTOCAST)[1] is None  # the no-grad passes skip it
        for i, (q, r) in enumerate(sequences):
            full = torch.log_softmax(model(input_ids=torch.tensor([q + r])).logits[0].float() / 0.7, -1)
            expected = full[len(q) - 1 : len(q) + len(r) - 1]
            assert torch.allclose(logprobs[i, : len(r)], expected.gather(-1, torch.tensor(r)[:, None])[:, 0],
                                  atol=1e-5)
            assert torch.allclose(entropy[i, : len(r)], -(expected.exp() * expected).sum(-1), atol=1e-4)


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest fp32 tensor with a vocabulary-sized last dimension that any op creates."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_training_step_creates_a_full_fp32_vocabulary_tensor(toy):
    model, tok, pairs = toy
    V = model.config.vocab_size
    model.train()
    try:
        batch = dpo.collate_pairs(pairs, tok.pad_token_id)
        B, T = batch["input_ids"].shape
        K = batch["labels"].shape[1]  # the kept positions: the longest response + 1
        assert K < T * 0.8  # the prompts are a real share of the batch
        with LargestVocabTensor(V) as seen:
            dpo.batch_logps(model, batch, NO_AUTOCAST).sum().backward()
        assert seen.largest == B * K * V  # the kept logits (and their gradient), never B * T * V
        model.zero_grad()
        batch = sft.collate([{"input_ids": p["chosen"]["input_ids"], "labels": p["chosen"]["labels"]}
                             for p in pairs], tok.pad_token_id)
        B, T = batch["input_ids"].shape
        with LargestVocabTensor(V) as seen:
            sft.sft_loss_sum(sft.forward_logits(model, batch, NO_AUTOCAST), batch["labels"]).backward()
        assert seen.largest == B * batch["labels"].shape[1] * V < B * T * V
    finally:
        model.zero_grad()
        model.eval()


def test_fused_adamw_takes_the_same_step():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    for group, fused in ((params, True), (copies, False)):
        opt = torch.optim.AdamW(group, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
        for step in range(3):
            for p in group:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
    for a, b in zip(params, copies):
        assert torch.allclose(a, b, atol=1e-6)
