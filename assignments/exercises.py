"""The one place that says what each assignment asks: the script it is cut from and the functions
blanked in it (the exercises). make.py generates the stubs from this; checks.py grades them."""

EXERCISES = {
    "sft": ("sft.py", ["sft_loss_sum"]),
    "reward_model": ("reward_model.py", ["bradley_terry_loss", "last_token_index"]),
    "dpo": ("dpo.py", ["dpo_loss", "sequence_logps"]),
    "ppo": ("ppo.py", ["eos_trick", "kl_penalized_rewards", "compute_gae", "ppo_policy_loss",
                       "ppo_value_loss"]),
    "var": ("var.py", ["var_weights"]),
    "dera": ("dera.py", ["realigned_logits"]),
    "expo": ("expo.py", ["extrapolate"]),
}
