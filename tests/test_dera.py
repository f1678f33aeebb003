"""dera.py: Proposition 1 and Appendix B, the cached batched decoder against a no-cache loop and
against transformers' generate, sampling filters, the weight-combining variant, and the toy sweep."""

import json

import pytest
import torch

import dera
from conftest import PROMPT_FILE_ARGS, TOY, prompt_file, toy_prompts


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_proposition_1(lam):
    torch.manual_seed(0)
    h_ref, h_aligned = torch.randn(8, 50) * 3, torch.randn(8, 50) * 3
    p_ref, p_aligned = h_ref.softmax(-1), h_aligned.softmax(-1)
    target = p_ref * (p_aligned / p_ref) ** lam
    target = target / target.sum(-1, keepdim=True)
    assert torch.allclose(dera.realigned_logits(h_ref, h_aligned, lam).softmax(-1), target, atol=1e-6)
    if lam == 0.0:
        assert torch.allclose(dera.realigned_logits(h_ref, h_aligned, lam).softmax(-1), p_ref)
    if lam == 1.0:
        assert torch.allclose(dera.realigned_logits(h_ref, h_aligned, lam).softmax(-1), p_aligned, atol=1e-6)


def test_appendix_b_several_aligned_models():
    torch.manual_seed(1)
    h_ref, h1, h2 = (torch.randn(4, 30) for _ in range(3))
    lam = [0.7, 0.6]
    target = h_ref.softmax(-1) ** (1 - sum(lam)) * h1.softmax(-1) ** lam[0] * h2.softmax(-1) ** lam[1]
    target = target / target.sum(-1, keepdim=True)
    assert torch.allclose(dera.realigned_logits(h_ref, [h1, h2], lam).softmax(-1), target, atol=1e-6)


def test_sample_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert dera.sample_token(logits, 0.0, 0, 1.0).item() == 0  # greedy
    draws = lambda **kw: {dera.sample_token(logits, 1.0, generator=g, **kw).item() for _ in range(300)}
    assert draws(top_k=1, top_p=1.0) == {0}
    assert draws(top_k=2, top_p=1.0) == {0, 1}
    assert draws(top_k=0, top_p=0.7) == {0, 1}  # 0.5 < 0.7: the second token is needed, the third is not
    assert draws(top_k=0, top_p=0.8) == {0, 1}  # exactly reached at 0.8
    assert draws(top_k=0, top_p=1.0) == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def models():
    tokenizer = dera.load_tokenizer(str(TOY / "sft"), False)
    tokenizer.padding_side = "left"
    ref = dera.load_model(str(TOY / "sft"), False).eval()
    aligned = dera.load_model(str(TOY / "dpo"), False).eval()
    prompts = [dera.format_prompt(tokenizer, p) for p in toy_prompts("validation")[:6]]
    return ref, aligned, tokenizer, prompts


def greedy(ref, aligned, lam, tokenizer, texts, max_new_tokens=20):
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return dera.dera_generate(ref, aligned, batch["input_ids"], batch["attention_mask"], lam, max_new_tokens,
                              temperature=0.0, stop_ids=[tokenizer.eos_token_id],
                              pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def no_cache_greedy(ref, aligned, lam, tokenizer, text, max_new_tokens=20):
    """Algorithm 1 literally: both models re-read the whole sequence at every step."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(max_new_tokens):
        h = dera.realigned_logits(ref(ids).logits[:, -1], aligned(ids).logits[:, -1], lam)
        token = h.argmax(-1)
        out.append(token.item())
        if token.item() == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, token[:, None]], 1)
    return out


def strip(row, tokenizer):
    row = row.tolist()
    return row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_cached_batched_decoding_equals_no_cache_loop_and_single_prompts(models, lam):
    ref, aligned, tokenizer, prompts = models
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 2  # the batch is really left-padded
    batched, realigned_lp, ref_lp = greedy(ref, aligned, lam, tokenizer, prompts)
    for i, text in enumerate(prompts):
        expected = no_cache_greedy(ref, aligned, lam, tokenizer, text)
        assert strip(batched[i], tokenizer) == expected
        assert strip(greedy(ref, aligned, lam, tokenizer, [text])[0][0], tokenizer) == expected
    assert (realigned_lp <= 0).all() and (ref_lp <= 0).all()


@pytest.mark.parametrize("lam, which", [(1.0, "aligned"), (0.0, "ref")])
def test_lambda_one_and_zero_are_the_aligned_and_reference_models(models, lam, which):
    ref, aligned, tokenizer, prompts = models
    model = aligned if which == "aligned" else ref
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    theirs = model.generate(**batch, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id,
                            top_k=None, top_p=None, temperature=None)[:, batch["input_ids"].shape[1] :]
    ours, realigned_lp, ref_lp = greedy(ref, aligned, lam, tokenizer, prompts)
    for a, b in zip(ours, theirs):
        assert strip(a, tokenizer) == strip(b, tokenizer)
    if lam == 0.0:
        assert torch.equal(realigned_lp, ref_lp)  # KL to the reference is exactly 0


def test_combine_weights_endpoints(models):
    ref, aligned, _, _ = models
    for lam, source in [(0.0, ref), (1.0, aligned)]:
        combined = dera.combine_weights(ref, [aligned], [lam])
        for (name, p), q in zip(combined.state_dict().items(), source.state_dict().values()):
            assert torch.allclose(p, q, atol=1e-6), name
    half = dera.combine_weights(ref, [aligned], [0.5]).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(half[name], (ref.state_dict()[name] + aligned.state_dict()[name]) / 2, atol=1e-6)


def test_mismatched_models_fail_before_compute(models, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ref, _, _, _ = models
    other = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(SystemExit, match="one vocabulary"):
        dera.check_compatible(ref, [other], ["other"], "logits")
    tok = AutoTokenizer.from_pretrained(TOY / "dpo")
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="different vocabulary"):
        dera.main(dera.Args(aligned=[str(tmp_path / "other")], output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_toy_sweep_reward_rises_with_lambda(tmp_path):
    results = dera.main(dera.Args(lambdas=[0.0, 0.5, 1.0], num_prompts=96, max_new_tokens=48,
                                  output_dir=str(tmp_path / "run")))
    rows = results["table"]
    assert [r["lambda"] for r in rows] == ["0", "0.5", "1"]
    score = [r["eval/score"] for r in rows]
    se = max(r["eval/score_se"] for r in rows)
    assert score[1] > score[0] - se and score[2] > score[1] - se and score[2] > score[0] + 3 * se
    assert rows[0]["eval/kl"] == 0.0 and rows[2]["eval/kl"] > rows[1]["eval/kl"] > 0
    assert results["perf/tokens_per_s"] > 0 and results["perf/tokens_per_s_one_model"] > 0
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(samples) == 3 * 96 and {s["lambda"] for s in samples} == {"0", "0.5", "1"}


def decode(ref, aligned: list, lam: list, prompts: list, tokenizer, stop_ids: list) -> tuple:
    """The test's own sweep point: batches of 4 prompts, 12 tokens at T = 0.8, top-k 3, top-p 0.8, from a
    generator seeded 3 (the settings below): (responses, log-ratios to the first model)."""
    generator, responses, logratios = torch.Generator().manual_seed(3), [], []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), 4):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + 4]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tokens, realigned_lp, ref_lp = dera.dera_generate(
            ref, aligned, batch["input_ids"], batch["attention_mask"], lam, 12, 0.8, 3, 0.8, stop_ids,
            tokenizer.pad_token_id, generator)
        responses += tokenizer.batch_decode(tokens, skip_special_tokens=True)
        logratios += (realigned_lp - ref_lp).sum(-1).tolist()
    return responses, logratios


def test_every_row_samples_its_own_setting_with_the_same_random_numbers(tmp_path):
    """Each row of main's sweep is exactly what the test's own decoding draws for that lambda alone
    from a fresh generator: the same responses and log-ratios. The roles are reversed (toy/dpo the
    reference, toy/sft aligned), lambda 1 comes twice around 0.3, and every option is off its default
    (the prompts too, by conftest.prompt_file), so that a generator shared across rows, a swap of the two
    models, or an option left at its default shows. Lambda 1 is the aligned model decoded alone; in
    --mode weights, 0.3 is the combined weights decoded alone."""
    tokenizer = dera.load_tokenizer(str(TOY / "sft"), False)
    ref, aligned = (dera.load_model(str(TOY / name), False).eval() for name in ("dpo", "sft"))
    stop_ids = dera.stop_token_ids(tokenizer, str(TOY / "sft"))
    prompts = prompt_file(tmp_path / "prompts.jsonl")
    settings = dict(ref=str(TOY / "dpo"), aligned=[str(TOY / "sft")], reward_model="none",
                    prompts=str(tmp_path / "prompts.jsonl"), **PROMPT_FILE_ARGS, max_new_tokens=12,
                    temperature=0.8, top_k=3, top_p=0.8, batch_size=4, seed=3)
    alone = decode(aligned, [], [], prompts, tokenizer, stop_ids)[0]
    mixed = {lam: decode(ref, [aligned], [lam], prompts, tokenizer, stop_ids) for lam in (1.0, 0.3)}
    for mode, lambdas in (("logits", [1.0, 0.3, 1.0]), ("weights", [0.3])):
        args = dera.Args(**settings, mode=mode, lambdas=lambdas, output_dir=str(tmp_path / mode))
        results = dera.main(args)
        rows = [json.loads(line) for line in open(tmp_path / mode / "samples.jsonl")]
        assert [r["lambda"] for r in results["table"]] == [f"{lam:g}" for lam in lambdas]
        assert len(rows) == 6 * len(lambdas)
        for k, lam in enumerate(lambdas):
            row = rows[6 * k : 6 * (k + 1)]
            responses, logratios = mixed[lam]
            if mode == "weights":  # the combined model (at lambda 1, alone), its log-ratio to the reference
                combined = dera.combine_weights(ref, [aligned], [lam])
                responses, logratios = decode(ref, [combined], [1.0], prompts, tokenizer, stop_ids)
                assert responses == decode(combined, [], [], prompts, tokenizer, stop_ids)[0]
            assert [s["logratio"] for s in row] == pytest.approx(logratios, abs=1e-5)
            if lam == 1.0:
                assert responses == alone
            assert [s["prompt"] for s in row] == prompts and {s["score"] for s in row} == {None}
            assert [s["response"] for s in row] == responses, (mode, lam)
        if mode == "logits":  # lambda 0.3 samples otherwise than lambda 1: the checks above can fail
            assert [s["response"] for s in rows[:6]] != [s["response"] for s in rows[6:12]]
