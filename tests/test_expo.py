"""expo.py: Eq. 1 per tensor (alpha = 0, alpha = -1, linearity, fp32 arithmetic for bf16), the streamed
checkpoint (multi-shard round trip, bit-for-bit alpha = 0, mismatches refused), and a smoke run of the
alpha search on the toy."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import expo
from conftest import PROMPT_FILE_ARGS, TOY, prompt_file


def tensors_of(path) -> dict:
    """Every tensor of a checkpoint directory, whatever its sharding."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def tiny_llama(seed: int, layers: int = 2, intermediate: int = 64, noise_from=None, dtype=torch.float32):
    """A tiny random Llama with the toy's vocabulary; `noise_from` makes it a small step away from
    another model (an 'aligned' model trained from it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=592,
                         tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if noise_from is not None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), noise_from.parameters()):
                p.copy_(q + 0.01 * torch.randn_like(q))
    return model.to(dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An SFT model saved as one file and a model 'aligned' from it saved in several shards with an
    index (so the streaming looks tensors up across different layouts), in fp32 and in bf16, with the
    toy's tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("expo-checkpoints")
    tokenizer = AutoTokenizer.from_pretrained(TOY / "sft")
    sft = tiny_llama(0)
    aligned = tiny_llama(1, noise_from=sft)
    paths = {}
    for dtype, suffix in [(torch.float32, ""), (torch.bfloat16, "_bf16")]:
        for name, model, shard in [("sft", sft, "50MB"), ("aligned", aligned, "20KB")]:
            paths[name + suffix] = root / (name + suffix)
            model.to(dtype).save_pretrained(paths[name + suffix], max_shard_size=shard)
            tokenizer.save_pretrained(paths[name + suffix])
    assert len(list(paths["aligned"].glob("*.safetensors"))) > 3
    assert (paths["sft"] / "model.safetensors").exists()
    return paths


def test_extrapolate_is_eq1_exact_at_the_ends_and_linear():
    g = torch.Generator().manual_seed(0)
    sft = torch.randn(64, 32, generator=g)
    aligned = sft + 0.01 * torch.randn(64, 32, generator=g)
    for alpha in [-0.5, 0.3, 2.0]:
        expected = (1 + alpha) * aligned - alpha * sft  # Eq. 1, its first form
        assert torch.allclose(expo.extrapolate(sft, aligned, alpha), expected, atol=1e-6)
    at_0, at_1 = expo.extrapolate(sft, aligned, 0.0), expo.extrapolate(sft, aligned, 1.0)
    assert torch.equal(at_0.view(torch.int32), aligned.view(torch.int32))  # bit for bit
    assert at_0.data_ptr() != aligned.data_ptr()  # a new tensor, not a view of the input
    assert torch.allclose(expo.extrapolate(sft, aligned, -1.0), sft, rtol=0, atol=1e-6)
    assert torch.allclose(expo.extrapolate(sft, aligned, 0.5), (at_0 + at_1) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(at_1, aligned)
    steps = torch.ones(5, dtype=torch.long)  # an integer buffer is copied, not extrapolated
    assert torch.equal(expo.extrapolate(steps * 3, steps, 0.5), steps)


def test_bf16_is_extrapolated_in_fp32():
    g = torch.Generator().manual_seed(0)
    sft = torch.randn(4096, generator=g).bfloat16()
    aligned = (sft.float() + 0.02 * torch.randn(4096, generator=g)).bfloat16()
    out = expo.extrapolate(sft, aligned, 0.3)
    in_fp32 = (aligned.float() + 0.3 * (aligned.float() - sft.float())).bfloat16()
    in_bf16 = aligned + 0.3 * (aligned - sft)  # rounds twice in bf16
    assert out.dtype == torch.bfloat16 and torch.equal(out, in_fp32)
    assert (in_bf16 != in_fp32).sum() > 10  # the two really differ, so the check above can fail
    assert torch.equal(expo.extrapolate(sft, aligned, -1.0), sft)  # bf16 differences are exact in fp32


def test_alpha_0_reproduces_the_aligned_checkpoint_bit_for_bit(checkpoints, tmp_path):
    aligned = checkpoints["aligned"]
    counts = expo.extrapolate_checkpoint(checkpoints["sft"], aligned, tmp_path / "out", 0.0)
    assert counts["extrapolated"] == len(tensors_of(aligned)) and counts["copied"] == 0
    shards = sorted(p.name for p in aligned.glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    for name in shards + ["model.safetensors.index.json", "config.json", "generation_config.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (aligned / name).read_bytes(), name
    assert not (tmp_path / "out" / ".saving").exists()


def test_alpha_minus_1_gives_the_sft_weights_and_the_result_is_linear(checkpoints, tmp_path):
    sft = tensors_of(checkpoints["sft"])
    results = {}
    for alpha in [-1.0, 0.0, 0.5, 1.0]:
        expo.extrapolate_checkpoint(checkpoints["sft"], checkpoints["aligned"], tmp_path / str(alpha), alpha)
        results[alpha] = tensors_of(tmp_path / str(alpha))
    assert results[-1.0].keys() == sft.keys()
    for name, theta_0 in sft.items():
        assert torch.allclose(results[-1.0][name], theta_0, rtol=0, atol=1e-6), name
        assert torch.allclose(results[0.5][name], (results[0.0][name] + results[1.0][name]) / 2, rtol=0,
                              atol=1e-6), name
    assert any(not torch.equal(results[1.0][n], results[0.0][n]) for n in sft)


def test_multi_shard_round_trip_loads_with_its_index(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    expo.extrapolate_checkpoint(checkpoints["sft"], checkpoints["aligned"], out, 0.3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = json.loads((checkpoints["aligned"] / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"] and len(set(index["weight_map"].values())) > 3
    for shard in set(index["weight_map"].values()):  # each tensor in the shard the index names
        with safe_open(out / shard, "pt") as f, safe_open(checkpoints["aligned"] / shard, "pt") as g:
            assert set(f.keys()) == set(g.keys()) and f.metadata() == g.metadata()
    model = AutoModelForCausalLM.from_pretrained(out)
    aligned_dir = checkpoints["aligned"]
    sft, aligned = tensors_of(checkpoints["sft"]), tensors_of(aligned_dir)
    state = model.state_dict()
    for name in aligned:
        assert torch.equal(state[name], expo.extrapolate(sft[name], aligned[name], 0.3)), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(aligned_dir).get_vocab()


def test_bf16_checkpoint_is_extrapolated_in_fp32(checkpoints, tmp_path):
    expo.extrapolate_checkpoint(checkpoints["sft_bf16"], checkpoints["aligned_bf16"], tmp_path / "out", 0.5)
    out = tensors_of(tmp_path / "out")
    sft, aligned = tensors_of(checkpoints["sft_bf16"]), tensors_of(checkpoints["aligned_bf16"])
    differs = 0
    for name in aligned:
        in_fp32 = (aligned[name].float() + 0.5 * (aligned[name].float() - sft[name].float())).bfloat16()
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], in_fp32), name
        differs += (aligned[name] + 0.5 * (aligned[name] - sft[name]) != in_fp32).sum().item()
    assert differs > 0


def test_fp32_sft_and_bf16_aligned_extrapolate_in_fp32_and_save_bf16(checkpoints, tmp_path):
    expo.extrapolate_checkpoint(checkpoints["sft"], checkpoints["aligned_bf16"], tmp_path / "out", 0.3)
    out = tensors_of(tmp_path / "out")
    sft, aligned = tensors_of(checkpoints["sft"]), tensors_of(checkpoints["aligned_bf16"])
    for name in aligned:
        in_fp32 = (aligned[name].float() + 0.3 * (aligned[name].float() - sft[name].float())).bfloat16()
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], in_fp32), name


def test_mismatched_checkpoints_fail_listing_the_tensors(checkpoints, tmp_path):
    other = tiny_llama(2, layers=3, intermediate=48)  # an extra layer and other MLP shapes
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="differ in") as error:
        expo.extrapolate_checkpoint(checkpoints["sft"], tmp_path / "other", tmp_path / "out", 0.3)
    message = str(error.value)
    assert "model.layers.2.mlp.up_proj.weight: only in the aligned checkpoint" in message
    assert "model.layers.0.mlp.up_proj.weight: F32[64, 32] in the SFT checkpoint, F32[48, 32]" in message
    assert not (tmp_path / "out").exists()  # nothing written
    (tmp_path / "bin").mkdir()  # e.g. only pytorch_model.bin
    with pytest.raises(SystemExit, match="no model.safetensors"):
        expo.extrapolate_checkpoint(tmp_path / "bin", checkpoints["aligned"], tmp_path / "out", 0.3)


def test_alpha_search_on_the_toy(tmp_path):
    """Two alphas on a few dev prompts: one row each, alpha = 0 is the aligned model (KL exactly 0),
    and the saved model is the extrapolation of toy/sft and toy/dpo at the chosen alpha."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    results = expo.main(expo.Args(output_dir=str(out), alphas=(0.0, 1.0), num_prompts=12, max_new_tokens=40,
                                  batch_size=12))
    table = results["table"]
    assert [row["alpha"] for row in table] == [0.0, 1.0]
    assert json.loads((out / "eval.json").read_text()) == results
    assert results["best_alpha"] == max(table, key=lambda row: row["eval/score"])["alpha"]
    assert table[0]["eval/kl"] == 0.0 and table[1]["eval/kl"] > 0.1
    assert all(0 < row["eval/score_se"] < 2 and row["eval/length"] > 3 for row in table)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 24 and [s["alpha"] for s in samples] == [0.0] * 12 + [1.0] * 12
    assert {"prompt", "response", "score", "logratio", "length"} <= set(samples[0])
    assert (out / "args.json").exists() and not list(out.glob(".alpha-*")) and not (out / ".saving").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    sft, dpo = tensors_of(TOY / "sft"), tensors_of(TOY / "dpo")
    state = model.state_dict()
    for name in dpo:
        assert torch.equal(state[name], expo.extrapolate(sft[name], dpo[name], results["best_alpha"])), name


@torch.no_grad()
def own_samples(policy, reference, reward_model, tokenizer, prompts: list, stop_ids: list) -> list:
    """The test's own evaluation of one alpha: seed 3, batches of 4 prompts sampled by transformers'
    generate at T = 0.8 for up to 12 tokens, cut at the first stop id; each response's score at its
    last token and its log-ratio at T from unpadded forwards. [(response, score, logratio)]"""
    torch.manual_seed(3)
    tokenizer.padding_side, rows = "left", []
    for i in range(0, len(prompts), 4):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + 4]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = policy.generate(**batch, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=12,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
        for text, generated in zip(texts, out[:, batch["input_ids"].shape[1] :].tolist()):
            ends = [t for t, token in enumerate(generated) if token in stop_ids]
            response = generated[: ends[0] + 1] if ends else generated
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + response])

            def logp(model):  # log pi_T(response | prompt)
                logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / 0.8
                return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).sum().item()
            score = reward_model.score(reward_model.model(ids).last_hidden_state[0, -1]).item()
            rows.append((tokenizer.decode(response, skip_special_tokens=True), score,
                         logp(policy) - logp(reference)))
    return rows


def test_every_row_samples_its_own_alpha_with_the_same_random_numbers(doubled_rm, tmp_path):
    """Each row of main's search is exactly what the test's own evaluation draws from that alpha's
    weights alone, seeded afresh: the same responses, scores and log-ratios to the aligned model. toy/dpo
    plays the SFT model and toy/sft the aligned one, the reward model's head is doubled, alpha 0 comes
    twice around 0.4, and every option is off its default (the prompts too, by conftest.prompt_file): a
    seed drawn once for the whole search, the two checkpoints swapped, or an option left at its default
    would show. Alpha 0 is the aligned checkpoint."""
    prompts = prompt_file(tmp_path / "prompts.jsonl")
    args = expo.Args(sft=str(TOY / "dpo"), aligned=str(TOY / "sft"), reward_model=doubled_rm,
                     alphas=(0.0, 0.4, 0.0), prompts=str(tmp_path / "prompts.jsonl"), **PROMPT_FILE_ARGS,
                     max_new_tokens=12, temperature=0.8, batch_size=4, seed=3,
                     output_dir=str(tmp_path / "run"))
    expo.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(rows) == 18 and [r["prompt"] for r in rows] == prompts * 3
    tokenizer = expo.load_tokenizer(str(TOY / "sft"), False)
    stop_ids = expo.stop_token_ids(tokenizer, str(TOY / "sft"))
    aligned, reward_model = (expo.load_model(str(path), False, scalar=scalar).eval()
                             for path, scalar in ((TOY / "sft", False), (doubled_rm, True)))
    theta_0, theta_1 = (expo.load_model(str(TOY / name), False).state_dict() for name in ("dpo", "sft"))
    expected = {}
    for alpha in set(args.alphas):
        policy = expo.load_model(str(TOY / "sft"), False).eval()
        policy.load_state_dict({k: expo.extrapolate(theta_0[k], theta_1[k], alpha) for k in theta_1})
        expected[alpha] = own_samples(policy, aligned, reward_model, tokenizer, prompts, stop_ids)
    for k, alpha in enumerate(args.alphas):
        for got, (response, score, logratio) in zip(rows[6 * k : 6 * (k + 1)], expected[alpha], strict=True):
            assert got["alpha"] == alpha and got["response"] == response, alpha
            assert got["score"] == pytest.approx(score, abs=1e-4)
            assert got["logratio"] == pytest.approx(logratio, abs=1e-4)
    assert [r["response"] for r in rows[:6]] != [r["response"] for r in rows[6:12]]  # the check can fail


def test_bad_input_fails_before_any_work(tmp_path):
    from transformers import AutoTokenizer

    with pytest.raises(SystemExit, match="not found"):
        expo.main(expo.Args(sft=str(tmp_path / "missing"), output_dir=str(tmp_path / "out")))
    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="different vocabulary"):
        expo.main(expo.Args(reward_model=str(tmp_path / "other"), output_dir=str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="differ in"):  # the reward model is no causal LM of the same shape
        expo.main(expo.Args(sft=str(TOY / "rm"), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
