"""The mistakes the checks must catch: each mutant is a wrong version of one exercise, as a student
might write it. tests/test_assignments.py loads the reference script, swaps in each mutant, and
requires at least one level-1 or level-2 check to fail; so a check that no mistake trips is visible.

Each entry: (method, the mistake, the function replaced, its wrong source)."""

MUTANTS = [
    ("sft", "the mask ignored: prompt and padding counted", "sft_loss_sum", '''
def sft_loss_sum(logits, labels, chunk=128):
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).sum()
'''),
    ("sft", "no shift: position t scored on token t", "sft_loss_sum", '''
def sft_loss_sum(logits, labels, chunk=128):
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * (labels != -100)).sum()
'''),
    ("reward_model", "log(sigmoid(.)): overflows at large margins", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return -torch.log(torch.sigmoid(chosen_rewards.float() - rejected_rewards.float()))
'''),
    ("reward_model", "the chosen and rejected swapped", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return -F.logsigmoid(rejected_rewards.float() - chosen_rewards.float())
'''),
    ("reward_model", "the last token as mask.sum(1) - 1 (right padding only)", "last_token_index", '''
def last_token_index(attention_mask):
    return attention_mask.sum(1) - 1
'''),
    ("dpo", "beta outside the sigmoid", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    losses = -beta * F.logsigmoid(chosen - rejected)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "the reference ignored", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
'''),
    ("dpo", "a missing detach on the logged rewards", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen, beta * rejected
'''),
    ("dpo", "a mean over tokens where the paper sums", "sequence_logps", '''
def sequence_logps(logits, labels, temperature=1.0, chunk=128):
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)
    return picked.sum(1) / (target != -100).sum(1)
'''),
    ("dpo", "the temperature ignored", "sequence_logps", '''
def sequence_logps(logits, labels, temperature=1.0, chunk=128):
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    return (logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)).sum(1)
'''),
    ("ppo", "no EOS trick", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    return scores
'''),
    ("ppo", "the penalty added to the score instead of replacing it", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    return torch.where(finished, scores, scores + penalty)
'''),
    ("ppo", "beta ignored", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -(logprobs - ref_logprobs) * mask
    last = mask.sum(1).long() - 1
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
'''),
    ("ppo", "the score at the last position of the padded row", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs) * mask
    rewards[:, -1] += scores
    return rewards
'''),
    ("ppo", "GAE bootstraps past the end of the response", "compute_gae", '''
def compute_gae(rewards, values, mask, gamma, lam):
    R = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        last = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask
'''),
    ("ppo", "lambda forgotten in the recursion", "compute_gae", '''
def compute_gae(rewards, values, mask, gamma, lam):
    R = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        last = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask
'''),
    ("ppo", "padding counted in the policy loss's mean", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return (torch.max(unclipped, clipped) * mask).mean(), ((clipped > unclipped).float() * mask).mean()
'''),
    ("ppo", "min where the pessimistic bound takes max (no clipping in effect)", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.min(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the value clipped around the return, not the old value", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = returns + torch.clamp(values - returns, -clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    return loss, masked_mean(torch.zeros_like(values), mask)
'''),
    ("var", "the softmax over prompts (dim 0) instead of responses", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    scaled = rewards.float() / beta
    B = scaled.shape[0]
    if normalizer == "batch":
        return B * torch.softmax(scaled.diagonal(), dim=0)
    scores = scaled + (ref_logps.float() if normalizer == "ref" else 0)
    return B * torch.softmax(scores, dim=0).diagonal()
'''),
    ("var", "exp then divide: overflows", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    e = torch.exp(rewards.float() / beta)
    B = e.shape[0]
    if normalizer == "batch":
        return B * e.diagonal() / e.diagonal().sum()
    if normalizer == "ref":
        e = e * ref_logps.float().exp()
    return B * e.diagonal() / e.sum(1)
'''),
    ("dera", "lambda applied to the reference", "realigned_logits", '''
def realigned_logits(h_ref, h_aligned, lam):
    if isinstance(h_aligned, torch.Tensor):
        h_aligned, lam = [h_aligned], [lam]
    mixed = sum(lam) * h_ref.float()
    for h, l in zip(h_aligned, lam):
        mixed = mixed + (1 - l) * h.float()
    return mixed
'''),
    ("dera", "several aligned models: the reference weighted by 1 - lambda_1 only", "realigned_logits", '''
def realigned_logits(h_ref, h_aligned, lam):
    if isinstance(h_aligned, torch.Tensor):
        h_aligned, lam = [h_aligned], [lam]
    mixed = (1.0 - lam[0]) * h_ref.float()
    for h, l in zip(h_aligned, lam):
        mixed = mixed + l * h.float()
    return mixed
'''),
    ("expo", "extrapolated from the SFT end", "extrapolate", '''
def extrapolate(sft_tensor, aligned_tensor, alpha):
    if not aligned_tensor.is_floating_point():
        return aligned_tensor.clone()
    theta_0, theta_1 = sft_tensor.float(), aligned_tensor.float()
    return (theta_0 + alpha * (theta_1 - theta_0)).to(aligned_tensor.dtype)
'''),
    ("expo", "bf16 arithmetic: rounded twice", "extrapolate", '''
def extrapolate(sft_tensor, aligned_tensor, alpha):
    if not aligned_tensor.is_floating_point():
        return aligned_tensor.clone()
    return aligned_tensor + alpha * (aligned_tensor - sft_tensor.to(aligned_tensor.dtype))
'''),
]


def apply(module, function: str, source: str) -> None:
    """Replaces `function` in the loaded script `module` with the mutant's source (in its namespace)."""
    exec(compile(source, f"<mutant {function}>", "exec"), module.__dict__)
