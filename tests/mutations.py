"""Mistakes made by hand in the scripts, each with the test that must catch it: the proof that the
suite can fail where an algorithm is wired wrong. Kept as data so that a rewrite can prove them again:

    python tests/mutations.py              # each mutation on a copy of the repository: its test must fail
    python tests/mutations.py ppo.py       # only those of one script
    python tests/mutations.py --suite 3    # the whole suite on mutation 3: every test that catches it
    python tests/mutations.py --jobs 2     # two at a time

Not part of the suite (each mutation costs one pytest run); tests/test_mutations.py only checks that
every `old` text is still in its script exactly once. After a script changes, update `old` and `new`
here, run this file, and see every line say "caught"."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    script: str
    mistake: str
    old: str
    new: str
    test: str  # the pytest node id that must fail


WIRING = "tests/test_wiring.py::test_"
SPLIT = WIRING + "a_steps_gradient_does_not_depend_on_how_the_step_is_split"
RM_AT_EOS = WIRING + "reward_model_trains_on_the_score_at_the_eos_when_pad_is_eos"
PPO_MODELS = WIRING + "old_log_probs_reference_and_values_are_each_models_own"
VAR_GROUPS = WIRING + "var_scores_every_response_under_every_prompt_and_trains_each_group_on_its_weights"
DPO_LOGPS = WIRING + "dpo_feeds_the_loss_the_policys_and_the_references_log_probs"
DERA_ROWS = "tests/test_dera.py::test_every_row_samples_its_own_setting_with_the_same_random_numbers"
EXPO_ROWS = "tests/test_expo.py::test_every_row_samples_its_own_alpha_with_the_same_random_numbers"
EVAL_KL = "(batch_logps(policy, batch, autocast, args.temperature)\n                     - batch_logps(ref_model,"
EVAL_KL_SWAPPED = "(batch_logps(ref_model, batch, autocast, args.temperature)\n                     - batch_logps(policy,"
PPO_RECOMPUTED = """            for _ in range(args.ppo_epochs):
                with torch.no_grad():
                    old["logprobs"], _ = policy_logprobs(policy, mb, args.temperature, autocast)
                    old["values"], _ = values_and_scores(value_model, mb, autocast)
"""


def clip_off(script: str) -> Mutation:
    return Mutation(script, "the gradient norm measured but never clipped (an infinite max norm)",
                    "optimizer_step(optimizer, scheduler, args.max_grad_norm,",
                    'optimizer_step(optimizer, scheduler, float("inf"),',
                    f"{WIRING}the_optimiser_steps_on_the_clipped_gradient[{script[:-3]}]")


MUTATIONS = [
    Mutation("dpo.py", "each micro-batch's loss divided by its own pair count, not the optimiser step's",
             "(losses.sum() / n_pairs).backward()", "(losses.sum() / len(pairs)).backward()",
             f"{SPLIT}[dpo]"),
    Mutation("dpo.py", "a mean per micro-batch divided by the accumulation steps (unequal micro-batches)",
             "(losses.sum() / n_pairs).backward()",
             "(losses.mean() / args.gradient_accumulation_steps).backward()", f"{SPLIT}[dpo]"),
    Mutation("reward_model.py", "a mean per micro-batch, summed over the accumulation steps",
             "(losses.sum() / n_pairs).backward()", "losses.mean().backward()", f"{SPLIT}[reward_model]"),
    Mutation("reward_model.py", "the training loop scores with transformers' pooling (the token before "
             "EOS when pad == eos), not score()",
             'rewards = score(model, batch["input_ids"], batch["attention_mask"])\n'
             '            chosen_rewards',
             "rewards = model(**batch).logits.squeeze(-1).float()\n            chosen_rewards", RM_AT_EOS),
    Mutation("reward_model.py", "chosen and rejected rows swapped after the concatenated forward",
             "chosen_rewards, rejected_rewards = rewards.chunk(2)",
             "rejected_rewards, chosen_rewards = rewards.chunk(2)", RM_AT_EOS),
    Mutation("ppo.py", "with --ppo_epochs 2, the old log-probs and values recomputed before every epoch",
             "            for _ in range(args.ppo_epochs):\n", PPO_RECOMPUTED,
             WIRING + "ratio_is_taken_against_the_rollout_policy"),
    Mutation("ppo.py", "the rollouts scored by the value model (the reward model's copy at the start only)",
             "_, scores = values_and_scores(reward_model, part, autocast)",
             "_, scores = values_and_scores(value_model, part, autocast)",
             WIRING + "scores_are_the_frozen_reward_models_at_each_stop_token"),
    Mutation("ppo.py", "the KL's arguments swapped: log pi_ref - log pi in the token rewards",
             "rewards = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, args.beta)",
             "rewards = kl_penalized_rewards(scores, ref_logprobs, old_logprobs, mask, args.beta)",
             PPO_MODELS),
    Mutation("ppo.py", "the values for GAE read from the frozen reward model, not the value model",
             "old_values, _ = values_and_scores(value_model, part, autocast)",
             "old_values, _ = values_and_scores(reward_model, part, autocast)", PPO_MODELS),
    Mutation("ppo.py", "gamma and lambda swapped in the call to GAE",
             "compute_gae(rewards, old_values * mask, mask, args.gamma, args.lam)",
             "compute_gae(rewards, old_values * mask, mask, args.lam, args.gamma)",
             WIRING + "main_passes_its_arguments_to_the_maths"),
    Mutation("ppo.py", "the reference's log-probs at temperature 1 while the policy's are at T",
             "ref_logprobs, _ = policy_logprobs(ref_model, part, args.temperature, autocast)",
             "ref_logprobs, _ = policy_logprobs(ref_model, part, 1.0, autocast)",
             WIRING + "kl_is_zero_before_the_first_update"),
    Mutation("ppo.py", "the old log-probs at temperature 1 while the update's are at T",
             "old_logprobs, _ = policy_logprobs(policy, part, args.temperature, autocast)",
             "old_logprobs, _ = policy_logprobs(policy, part, 1.0, autocast)",
             WIRING + "ratio_is_taken_against_the_rollout_policy"),
    Mutation("var.py", "every response of a group scored under the group's first prompt, r(x_0, y_j)",
             "seqs = [(group[i][0], group[j][1], True) for i, j in chunk]",
             "seqs = [(group[0][0], group[j][1], True) for i, j in chunk]", VAR_GROUPS),
    Mutation("var.py", "the reward matrix filled transposed, r(x_j, y_i)",
             "seqs = [(group[i][0], group[j][1], True) for i, j in chunk]",
             "seqs = [(group[j][0], group[i][1], True) for i, j in chunk]", VAR_GROUPS),
    Mutation("var.py", "every group trained on the first group's weights",
             "weights[k].to(device))  # Eq. 21", "weights[0].to(device))  # Eq. 21", VAR_GROUPS),
    Mutation("sft.py", "the prompt tokens given labels (the loss on the prompt as well as the response)",
             '"labels": [-100] * len(prompt_ids) + completion_ids})',
             '"labels": prompt_ids + completion_ids})',
             WIRING + "sft_labels_the_response_tokens_and_nothing_else"),
    Mutation("dpo.py", "the reference log-probs computed with the policy",
             "add_ref_logps(ref_model, train + evals,", "add_ref_logps(policy, train + evals,", DPO_LOGPS),
    Mutation("dpo.py", "chosen and rejected swapped after the concatenated forward",
             "policy_chosen_logps, policy_rejected_logps = batch_logps(policy, batch, autocast).chunk(2)",
             "policy_rejected_logps, policy_chosen_logps = batch_logps(policy, batch, autocast).chunk(2)",
             DPO_LOGPS),
    Mutation("ppo.py", "with g > 1, a mean of the passes' token means (short responses' tokens weigh more)",
             "((pg_loss + args.vf_coef * vf_loss) * (mask.sum() / n_tokens)).backward()",
             "((pg_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps).backward()",
             WIRING + "a_ppo_steps_gradient_does_not_depend_on_how_the_step_is_split"),
    Mutation("dera.py", "the cached steps not advancing the position: every new token at the prompt's last",
             "step_ids, positions = token[:, None], positions[:, -1:] + 1",
             "step_ids, positions = token[:, None], positions[:, -1:]",
             "tests/test_dera.py::test_cached_batched_decoding_equals_no_cache_loop_and_single_prompts"),
    Mutation("dera.py", "the KL's reference log-probs taken from the realigned logits (KL 0 at every lambda)",
             "for store, hh in ((realigned_logprobs, h), (ref_logprobs, logits[0])):",
             "for store, hh in ((realigned_logprobs, h), (ref_logprobs, h)):",
             "tests/test_dera.py::test_toy_sweep_reward_rises_with_lambda"),
    Mutation("expo.py", "the log-ratio taken against the extrapolated policy itself, not the aligned model",
             "- batch_logps(ref_model, batch, autocast, args.temperature))",
             "- batch_logps(policy, batch, autocast, args.temperature))",
             "tests/test_expo.py::test_alpha_search_on_the_toy"),
    Mutation("expo.py", "theta_0 read from the aligned checkpoint (every alpha gives the aligned model)",
             'with safe_open(sft_dir / sft_specs[name][2], framework="pt") as f:',
             'with safe_open(aligned_dir / shard, framework="pt") as f:',
             "tests/test_expo.py::test_alpha_minus_1_gives_the_sft_weights_and_the_result_is_linear"),
    *[clip_off(script) for script in ("sft.py", "reward_model.py", "dpo.py", "var.py", "ppo.py")],
    # issue 39's families: an option ignored, two roles swapped, a sweep without common random numbers, a
    # mode right only at its trivial setting
    Mutation("sft.py", "--adam_betas ignored: AdamW built with its default betas",
             "betas=args.adam_betas, eps=eps,", "eps=eps,",
             "tests/test_options.py::test_the_optimiser_steps_with_the_options_schedule[sft]"),
    Mutation("var.py", "--normalizer ignored by the weights (the reward normaliser whatever is asked)",
             "var_weights(rewards, args.beta, args.normalizer, ref_logps",
             'var_weights(rewards, args.beta, "reward", ref_logps',
             "tests/test_options.py::test_the_methods_own_options_land[var]"),
    Mutation("dpo.py", "--seed ignored by the sampling evaluation (seeded 0 whatever is asked)",
             "    with torch.random.fork_rng(), autocast:  # sampled in the precision its log-probs are taken in\n"
             "        torch.manual_seed(args.seed)",
             "    with torch.random.fork_rng(), autocast:  # sampled in the precision its log-probs are taken in\n"
             "        torch.manual_seed(0)", "tests/test_options.py::test_the_methods_own_options_land[dpo]"),
    Mutation("var.py", "--dropout ignored: dropout always off", "    if not args.dropout:\n        disable_dropout(policy)",
             "    if True:\n        disable_dropout(policy)",
             "tests/test_real_like.py::test_main_trains_without_dropout_unless_asked[var]"),
    Mutation("reward_model.py", "the logged training accuracy reads rejected over chosen (the loss is right)",
             '"train/accuracy": (chosen_rewards > rejected_rewards)', '"train/accuracy": (rejected_rewards > chosen_rewards)',
             RM_AT_EOS),
    Mutation("reward_model.py", "the evaluation's chosen and rejected halves swapped",
             "chosen.append(rewards[:n].cpu())\n        rejected.append(rewards[n:].cpu())",
             "chosen.append(rewards[n:].cpu())\n        rejected.append(rewards[:n].cpu())",
             WIRING + "reward_model_evaluation_reads_chosen_over_rejected"),
    Mutation("dpo.py", "the logged margin reads rejected over chosen (the loss is right)",
             '"rewards/margin": chosen_rewards - rejected_rewards', '"rewards/margin": rejected_rewards - chosen_rewards',
             WIRING + "dpo_main_feeds_dpo_loss_the_arguments"),
    Mutation("ppo.py", "--value_model ignored: the value model starts from the reward model whatever is asked",
             "value_model = load_model(args.value_model or args.reward_model,",
             "value_model = load_model(args.reward_model,",
             "tests/test_options.py::test_the_methods_own_options_land[ppo]"),
    # two roles swapped, in the maths and in main
    Mutation("ppo.py", "the KL penalty's arguments swapped inside the maths: log pi_ref - log pi",
             "rewards = -beta * (logprobs - ref_logprobs) * mask", "rewards = -beta * (ref_logprobs - logprobs) * mask",
             "tests/test_ppo.py::test_kl_penalized_rewards_sum_to_score_minus_kl"),
    Mutation("ppo.py", "the ratio taken old over new", "ratio = torch.exp(logprobs - old_logprobs)",
             "ratio = torch.exp(old_logprobs - logprobs)",
             "tests/test_ppo.py::test_clipped_losses_equal_unclipped_inside_the_range"),
    Mutation("ppo.py", "the value clip centred on the new values, not the rollout's",
             "clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)",
             "clipped_values = values + torch.clamp(old_values - values, -clip, clip)",
             "tests/test_ppo.py::test_clipped_losses_equal_unclipped_inside_the_range"),
    Mutation("ppo.py", "main feeds the value loss the returns as the old values and the old values as returns",
             'ppo_value_loss(values, old["values"][sl], old["returns"][sl]',
             'ppo_value_loss(values, old["returns"][sl], old["values"][sl]',
             WIRING + "the_losses_take_the_rollouts_old_log_probs_values_and_returns"),
    Mutation("ppo.py", "main feeds the policy loss the old log-probs as new and the new as old",
             'ppo_policy_loss(logprobs, old["logprobs"][sl],', 'ppo_policy_loss(old["logprobs"][sl], logprobs,',
             WIRING + "the_losses_take_the_rollouts_old_log_probs_values_and_returns"),
    Mutation("ppo.py", "the logged KL reads pi_ref over pi (the penalty is right)",
             "kl = ((old_logprobs - ref_logprobs) * mask).sum(1)", "kl = ((ref_logprobs - old_logprobs) * mask).sum(1)",
             WIRING + "the_logged_kl_is_policy_over_reference"),
    Mutation("dpo.py", "the log-ratios taken reference over policy",
             "    chosen_logratios = policy_chosen_logps - ref_chosen_logps\n"
             "    rejected_logratios = policy_rejected_logps - ref_rejected_logps",
             "    chosen_logratios = ref_chosen_logps - policy_chosen_logps\n"
             "    rejected_logratios = ref_rejected_logps - policy_rejected_logps",
             "tests/test_dpo.py::test_dpo_loss_matches_the_formula"),
    Mutation("dpo.py", "the chosen log-ratio against the rejected response's reference log-prob, and back",
             "    chosen_logratios = policy_chosen_logps - ref_chosen_logps\n"
             "    rejected_logratios = policy_rejected_logps - ref_rejected_logps",
             "    chosen_logratios = policy_chosen_logps - ref_rejected_logps\n"
             "    rejected_logratios = policy_rejected_logps - ref_chosen_logps",
             "tests/test_dpo.py::test_dpo_loss_matches_the_formula"),
    Mutation("var.py", "Z normalised over the prompts of a response (columns), not the responses of a prompt",
             "return B * torch.softmax(scaled, dim=1).diagonal()", "return B * torch.softmax(scaled, dim=0).diagonal()",
             "tests/test_var.py::test_reward_weights_are_algorithm_1"),
    Mutation("var.py", "log pi_ref(y_j | x_i) read transposed", "scores = ref_logps.float() + scaled",
             "scores = ref_logps.float().T + scaled",
             "tests/test_var.py::test_ref_weights_are_b_times_the_old_cross_estimator_and_survive_long_sequences"),
    Mutation("dera.py", "Eq. 9 with the reference and the aligned model swapped",
             "mixed = (1.0 - sum(lam)) * h_ref.float()", "mixed = (1.0 - sum(lam)) * h_aligned[0].float()\n"
             "    h_aligned = [h_ref] + list(h_aligned[1:])", "tests/test_dera.py::test_proposition_1"),
    Mutation("dera.py", "--top_k ignored by the sweep's decoder (every token kept)",
             "args.temperature, args.top_k, args.top_p, stop_ids", "args.temperature, 0, args.top_p, stop_ids",
             DERA_ROWS),
    Mutation("dera.py", "one random stream for the whole sweep: each lambda's row draws other numbers",
             "    generator = torch.Generator(device=device).manual_seed(args.seed)\n",
             "    generator = None\n", DERA_ROWS),
    Mutation("dera.py", "the reference and the aligned model swapped in main (the same at lambda 0.5)",
             "decode_all(ref, aligned, lam, prompts,", "decode_all(aligned[0], [ref], lam, prompts,", DERA_ROWS),
    Mutation("dera.py", "--mode weights combines the weights with the roles swapped (right at 0, 0.5 and 1)",
             "combine_weights(ref, aligned, lam)", "combine_weights(aligned[0], [ref], lam)", DERA_ROWS),
    Mutation("expo.py", "seeded once before the search: each alpha's samples draw other numbers",
             "        torch.manual_seed(args.seed)\n        start = time.time()", "        start = time.time()",
             EXPO_ROWS),
    Mutation("expo.py", "the SFT and aligned checkpoints swapped in main",
             "extrapolate_checkpoint(sft_dir, aligned_dir, alpha_dir,",
             "extrapolate_checkpoint(aligned_dir, sft_dir, alpha_dir,", EXPO_ROWS),
    *[Mutation(script, "the evaluation's log-ratio taken reference over policy (KL's sign flipped)", old, new,
               f"{WIRING}evaluation_scores_each_sample_and_its_log_ratio_policy_over_reference[{script[:-3]}]")
      for script, old, new in [("dpo.py", EVAL_KL, EVAL_KL_SWAPPED), ("var.py", EVAL_KL, EVAL_KL_SWAPPED),
                               ("expo.py", EVAL_KL, EVAL_KL_SWAPPED),
                               ("ppo.py", "((logprobs - ref_logprobs) * batch", "((ref_logprobs - logprobs) * batch")]],
    Mutation("ppo.py", "every iteration's optimiser steps take the episodes in rollout order",
             "order = torch.randperm(episodes_per_batch, device=device)",
             "order = torch.arange(episodes_per_batch, device=device)",
             WIRING + "each_iterations_steps_are_a_random_partition_of_its_episodes"),
]


def copy_of_repository(into: Path) -> Path:
    """The tracked and untracked (not ignored) files of the working tree, copied to `into`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def apply(mutation: Mutation, repo: Path) -> None:
    path = repo / mutation.script
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"error: {mutation.script}: the old text of '{mutation.mistake}' occurs {count} "
                         "times (it must occur once); update tests/mutations.py")
    path.write_text(text.replace(mutation.old, mutation.new))


def pytest(repo: Path, *targets: str, env=None) -> int:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets],
                          cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def prove(i: int, mutation: Mutation, jobs: int) -> bool:
    """Mutation i on a copy of the repository: whether its test fails there (printed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else None  # the jobs share the cores
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_of_repository(Path(tmp))
        apply(mutation, repo)
        code = pytest(repo, mutation.test, env=env)
    caught = code == 1  # 1: tests ran and failed; 2-5 (an error, nothing collected) prove nothing
    print(f"{i:2} {'caught' if caught else f'MISSED (pytest exit {code})':<8} {mutation.script}: "
          f"{mutation.mistake}", flush=True)
    return caught


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", nargs="?", help="only the mutations of this script")
    parser.add_argument("--suite", type=int, metavar="N", help="the whole suite on mutation N: its failures")
    parser.add_argument("--jobs", type=int, default=1, help="mutations proved at a time (one thread each)")
    args = parser.parse_args()
    if args.suite is not None:
        mutation = MUTATIONS[args.suite]
        with tempfile.TemporaryDirectory() as tmp:
            repo = copy_of_repository(Path(tmp))
            apply(mutation, repo)
            print(f"{mutation.script}: {mutation.mistake}")
            return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf"],
                                  cwd=repo).returncode
    chosen = [(i, m) for i, m in enumerate(MUTATIONS) if args.script in (None, m.script)]
    if not chosen:  # an empty test list would make pytest collect the whole suite
        raise SystemExit(f"error: no mutations for {args.script}")
    with tempfile.TemporaryDirectory() as tmp:
        clean = copy_of_repository(Path(tmp) / "clean")
        if pytest(clean, *sorted({m.test for _, m in chosen})) != 0:  # failing anyway, it would prove nothing
            raise SystemExit("error: the target tests fail on the unmutated scripts; fix them first")
    with ThreadPoolExecutor(args.jobs) as pool:
        missed = sum(not caught for caught in pool.map(lambda job: prove(*job, args.jobs), chosen))
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught by their tests")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
