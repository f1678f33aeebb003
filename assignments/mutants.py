"""The mistakes the checks must catch: each mutant is a wrong version of one exercise, as a student
might write it, with one branch of the formula removed or changed. tests/test_assignments.py loads the
reference script, swaps in each mutant, and requires at least one level-1 or level-2 check to fail;
so an input that stops arming a branch, or a check that no mistake trips, is visible.

Each entry: (method, the mistake, the function replaced, its wrong source)."""

MUTANTS = [
    # ---- sft_loss_sum
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
    ("sft", "a token mean where the docstring asks for the sum", "sft_loss_sum", '''
def sft_loss_sum(logits, labels, chunk=128):
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * (target != -100)).sum() / (target != -100).sum()
'''),
    ("sft", "the log-softmax over positions, not the vocabulary", "sft_loss_sum", '''
def sft_loss_sum(logits, labels, chunk=128):
    logp = torch.log_softmax(logits[:, :-1].float(), 1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * (target != -100)).sum()
'''),
    ("sft", "the chunk loop drops the partial last chunk", "sft_loss_sum", '''
def sft_loss_sum(logits, labels, chunk=128):
    logits, labels = logits[:, :-1], labels[:, 1:]
    total = torch.zeros((), device=logits.device)
    for i in range(max(labels.shape[1] // chunk, 1)):
        part, target = logits[:, i * chunk : (i + 1) * chunk].float(), labels[:, i * chunk : (i + 1) * chunk]
        nll = part.logsumexp(-1) - part.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        total = total + (nll * (target != -100)).sum()
    return total
'''),
    ("sft", "fp32 dropped: the log-softmax in the logits' bf16", "sft_loss_sum", '''
def sft_loss_sum(logits, labels, chunk=128):
    logits, labels = logits[:, :-1], labels[:, 1:]
    total = torch.zeros((), device=logits.device)
    for t in range(0, labels.shape[1], chunk):
        part, target = logits[:, t : t + chunk], labels[:, t : t + chunk]
        nll = part.logsumexp(-1) - part.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        total = total + (nll * (target != -100)).sum()
    return total
'''),
    # ---- bradley_terry_loss, last_token_index
    ("reward_model", "log(sigmoid(.)): overflows at large margins", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return -torch.log(torch.sigmoid(chosen_rewards.float() - rejected_rewards.float()))
'''),
    ("reward_model", "the chosen and rejected swapped", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return -F.logsigmoid(rejected_rewards.float() - chosen_rewards.float())
'''),
    ("reward_model", "the sign flipped: log sigmoid, not its negative", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return F.logsigmoid(chosen_rewards.float() - rejected_rewards.float())
'''),
    ("reward_model", "the last token as mask.sum(1) - 1 (right padding only)", "last_token_index", '''
def last_token_index(attention_mask):
    return attention_mask.sum(1) - 1
'''),
    ("reward_model", "the first attended position, not the last", "last_token_index", '''
def last_token_index(attention_mask):
    return attention_mask.argmax(1)
'''),
    # ---- dpo_loss
    ("dpo", "beta outside the sigmoid", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * beta * F.logsigmoid(h) - label_smoothing * beta * F.logsigmoid(-h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "the reference ignored", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "chosen and rejected swapped", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = rejected - chosen
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
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
    ("dpo", "beta dropped from the implicit rewards", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen.detach(), rejected.detach()
'''),
    ("dpo", "label smoothing with eps and 1 - eps swapped", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif label_smoothing:
        losses = -label_smoothing * F.logsigmoid(beta * h) - (1 - label_smoothing) * F.logsigmoid(-beta * h)
    else:
        losses = -F.logsigmoid(beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "IPO's target as 1 / beta: the factor 1/2 dropped", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / beta) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    # ---- sequence_logps
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
    ("dpo", "sequence_logps without the shift", "sequence_logps", '''
def sequence_logps(logits, labels, temperature=1.0, chunk=128):
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return (logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)).sum(1)
'''),
    ("dpo", "sequence_logps with the mask dropped", "sequence_logps", '''
def sequence_logps(logits, labels, temperature=1.0, chunk=128):
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    return logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1).sum(1)
'''),
    ("dpo", "sequence_logps: the chunk loop drops the partial last chunk", "sequence_logps", '''
def sequence_logps(logits, labels, temperature=1.0, chunk=128):
    logits, labels = logits[:, :-1], labels[:, 1:]
    total = torch.zeros(labels.shape[0], device=logits.device)
    for i in range(max(labels.shape[1] // chunk, 1)):
        part = logits[:, i * chunk : (i + 1) * chunk].float() / temperature
        target = labels[:, i * chunk : (i + 1) * chunk]
        token_logps = part.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) - part.logsumexp(-1)
        total = total + (token_logps * (target != -100)).sum(1)
    return total
'''),
    ("dpo", "sequence_logps: fp32 dropped, the log-softmax in bf16", "sequence_logps", '''
def sequence_logps(logits, labels, temperature=1.0, chunk=128):
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1)
    target = labels[:, 1:]
    return (logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)).sum(1)
'''),
    # ---- eos_trick, kl_penalized_rewards
    ("ppo", "no EOS trick", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    return scores
'''),
    ("ppo", "the penalty added to the score instead of replacing it", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    return torch.where(finished, scores, scores + penalty)
'''),
    ("ppo", "the EOS trick inverted: the finished responses penalised", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    return torch.where(finished, torch.full_like(scores, penalty), scores)
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
    ("ppo", "the KL's sign flipped: the divergence rewarded", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = beta * (logprobs - ref_logprobs) * mask
    last = mask.sum(1).long() - 1
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
'''),
    ("ppo", "the mask dropped: a KL penalty after the end", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs)
    last = mask.sum(1).long() - 1
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
'''),
    # ---- compute_gae
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
    ("ppo", "gamma and lambda swapped", "compute_gae", '''
def compute_gae(rewards, values, mask, gamma, lam):
    R = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        last = (rewards[:, t] + lam * next_value - values[:, t] + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask
'''),
    ("ppo", "the returns not masked: garbage values after the end kept", "compute_gae", '''
def compute_gae(rewards, values, mask, gamma, lam):
    R = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        last = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values
'''),
    # ---- ppo_policy_loss
    ("ppo", "no clipping: -A * ratio alone", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    loss = masked_mean(-advantages * ratio, mask)
    return loss, masked_mean(((ratio - 1).abs() > clip).float(), mask)
'''),
    ("ppo", "the ratio clipped above only", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, max=1.0 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the ratio clipped below only", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, min=1.0 - clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "min where the pessimistic bound takes max (no clipping in effect)", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.min(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "padding counted in the policy loss's mean", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return (torch.max(unclipped, clipped) * mask).mean(), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "a sum over tokens where the loss is a mean", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return (torch.max(unclipped, clipped) * mask).sum(), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "a mean of per-sequence means, not over tokens", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_sequence = (torch.max(unclipped, clipped) * mask).sum(1) / mask.sum(1)
    return per_sequence.mean(), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the clip fraction over every position, padding included", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), (clipped > unclipped).float().mean()
'''),
    ("ppo", "the clip fraction counts ties (>=): every ratio inside the range", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped >= unclipped).float(), mask)
'''),
    # ---- ppo_value_loss
    ("ppo", "the value clipped around the return, not the old value", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = returns + torch.clamp(values - returns, -clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    return loss, masked_mean(torch.zeros_like(values), mask)
'''),
    ("ppo", "no value clipping", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    return 0.5 * masked_mean((values - returns) ** 2, mask), masked_mean(torch.zeros_like(values), mask)
'''),
    ("ppo", "the value clipped above only", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = old_values + torch.clamp(values - old_values, max=clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the value clipped below only", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = old_values + torch.clamp(values - old_values, min=-clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "min for max in the value loss", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.min(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the value loss's factor 1/2 dropped", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "padding counted in the value loss's mean", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * (torch.max(unclipped, clipped) * mask).mean()
    return loss, masked_mean((clipped > unclipped).float(), mask)
'''),
    # ---- var_weights
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
    ("var", "exp clamped against the overflow: wrong where the softmax saturates", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    scaled = (rewards.float() / beta).clamp(-80, 80)
    if normalizer == "ref":
        scaled = scaled + ref_logps.float()
    e = torch.exp(scaled)
    B = e.shape[0]
    if normalizer == "batch":
        return B * e.diagonal() / e.diagonal().sum()
    return B * e.diagonal() / e.sum(1)
'''),
    ("var", "the factor B dropped", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    scaled = rewards.float() / beta
    if normalizer == "batch":
        return torch.softmax(scaled.diagonal(), dim=0)
    scores = scaled + (ref_logps.float() if normalizer == "ref" else 0)
    return torch.softmax(scores, dim=1).diagonal()
'''),
    ("var", "r * beta where the paper divides by beta", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    scaled = rewards.float() * beta
    B = scaled.shape[0]
    if normalizer == "batch":
        return B * torch.softmax(scaled.diagonal(), dim=0)
    scores = scaled + (ref_logps.float() if normalizer == "ref" else 0)
    return B * torch.softmax(scores, dim=1).diagonal()
'''),
    ("var", "pi_ref left out of the 'ref' normaliser", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    scaled = rewards.float() / beta
    B = scaled.shape[0]
    if normalizer == "batch":
        return B * torch.softmax(scaled.diagonal(), dim=0)
    return B * torch.softmax(scaled, dim=1).diagonal()
'''),
    ("var", "fp32 dropped: the softmax in the rewards' bf16", "var_weights", '''
def var_weights(rewards, beta, normalizer="reward", ref_logps=None):
    scaled = rewards / beta
    B = scaled.shape[0]
    if normalizer == "batch":
        return B * torch.softmax(scaled.diagonal(), dim=0)
    scores = scaled + (ref_logps if normalizer == "ref" else 0)
    return B * torch.softmax(scores, dim=1).diagonal()
'''),
    # ---- realigned_logits
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
    ("dera", "lambda clamped to >= 0", "realigned_logits", '''
def realigned_logits(h_ref, h_aligned, lam):
    if isinstance(h_aligned, torch.Tensor):
        h_aligned, lam = [h_aligned], [lam]
    lam = [max(l, 0.0) for l in lam]
    mixed = (1.0 - sum(lam)) * h_ref.float()
    for h, l in zip(h_aligned, lam):
        mixed = mixed + l * h.float()
    return mixed
'''),
    ("dera", "fp32 dropped: the mixture in the logits' bf16", "realigned_logits", '''
def realigned_logits(h_ref, h_aligned, lam):
    if isinstance(h_aligned, torch.Tensor):
        h_aligned, lam = [h_aligned], [lam]
    mixed = (1.0 - sum(lam)) * h_ref
    for h, l in zip(h_aligned, lam):
        mixed = mixed + l * h
    return mixed
'''),
    # ---- extrapolate
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
    ("expo", "alpha clamped to >= 0", "extrapolate", '''
def extrapolate(sft_tensor, aligned_tensor, alpha):
    if not aligned_tensor.is_floating_point():
        return aligned_tensor.clone()
    theta_0, theta_1 = sft_tensor.float(), aligned_tensor.float()
    return (theta_1 + max(alpha, 0.0) * (theta_1 - theta_0)).to(aligned_tensor.dtype)
'''),
    ("expo", "integer buffers taken from the SFT model", "extrapolate", '''
def extrapolate(sft_tensor, aligned_tensor, alpha):
    if not aligned_tensor.is_floating_point():
        return sft_tensor.clone()
    theta_0, theta_1 = sft_tensor.float(), aligned_tensor.float()
    return (theta_1 + alpha * (theta_1 - theta_0)).to(aligned_tensor.dtype)
'''),
    ("expo", "the aligned tensor updated in place (an fp32 .float() is no copy)", "extrapolate", '''
def extrapolate(sft_tensor, aligned_tensor, alpha):
    if not aligned_tensor.is_floating_point():
        return aligned_tensor.clone()
    theta_0, theta_1 = sft_tensor.float(), aligned_tensor.float()
    return theta_1.add_(alpha * (theta_1 - theta_0)).to(aligned_tensor.dtype)
'''),
    # ---- mistakes outside the first catalogue (issue 38): each must be named in its feedback (NAMED)
    ("ppo", "the EOS penalty fixed at -10, the argument ignored", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    return torch.where(finished, scores, torch.full_like(scores, -10.0))
'''),
    ("ppo", "the score placed one token early", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs) * mask
    last = mask.sum(1).long() - 2
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
'''),
    ("ppo", "the KL penalty at the last token only, summed", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    kl = ((logprobs - ref_logprobs) * mask).sum(1)
    last = mask.sum(1).long() - 1
    rewards = torch.zeros_like(logprobs)
    rewards[torch.arange(len(scores)), last] = scores - beta * kl
    return rewards
'''),
    ("ppo", "the KL penalty twice: per token and summed at the last token", "kl_penalized_rewards", '''
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs) * mask
    last = mask.sum(1).long() - 1
    total = scores + rewards.sum(1)
    return rewards.scatter_add(1, last[:, None], total[:, None].to(rewards.dtype))
'''),
    ("ppo", "GAE run forwards", "compute_gae", '''
def compute_gae(rewards, values, mask, gamma, lam):
    R = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in range(R):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        last = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask
'''),
    ("ppo", "the clipped term alone, no max with the unclipped one", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(clipped, mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the ratio as exp(log pi) / exp(log pi_old)", "ppo_policy_loss", '''
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    ratio = logprobs.exp() / old_logprobs.exp()
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)
'''),
    ("ppo", "the value clip fraction always 0", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(unclipped, clipped), mask), torch.tensor(0.0)
'''),
    ("dpo", "-log(sigmoid(beta h)): overflows at large |beta h|", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * torch.log(torch.sigmoid(beta * h)) - label_smoothing * torch.log(torch.sigmoid(-beta * h))
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "policy and reference swapped", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = ref_chosen_logps - policy_chosen_logps, ref_rejected_logps - policy_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "the conservative-DPO term with the wrong sign", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("dpo", "IPO as (beta h - 1/2)^2", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (beta * h - 0.5) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
'''),
    ("reward_model", "-log(sigmoid(.)) of a clamped probability: finite, but saturates", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return -torch.log(torch.sigmoid(chosen_rewards.float() - rejected_rewards.float()).clamp(min=1e-7))
'''),
]


# The words the feedback of these mutants must contain: the check names the mistake, not only a number.
NAMED = {
    "the EOS penalty fixed at -10, the argument ignored": "the penalty fixed at -10",
    "-log(sigmoid(beta h)): overflows at large |beta h|": "log(sigmoid(x)) is log(0) in fp32",
    "the value clip fraction always 0": "— that is 0",
    "the clipped term alone, no max with the unclipped one": "the clipped term alone",
    "GAE run forwards": "GAE run forwards",
    "the KL penalty at the last token only, summed": "the KL penalty at the last token only",
    "the KL penalty twice: per token and summed at the last token": "the KL penalty twice",
    "the score placed one token early": "the score one token early",
    "the conservative-DPO term with the wrong sign": "the eps term's sign flipped",
    "IPO as (beta h - 1/2)^2": "(beta h - 1/2)^2",
    "policy and reference swapped": "policy and reference swapped",
    "the ratio as exp(log pi) / exp(log pi_old)": "take the ratio as exp(log pi - log pi_old)",
    "no shift: position t scored on token t": "no shift",
}

# Mistakes that fail two level-1/2 checks, and why: each reason is said in the assignment's handout
# (tests/test_assignments.py holds both). Every other mutant costs exactly one check.
TWICE = {
    "the log-softmax over positions, not the vocabulary":
        "a log-softmax over positions lets the padding's logits into every token's probability",
    "lambda applied to the reference":
        "swapping lambda and 1 - lambda breaks the several-models sum too",
}


def apply(module, function: str, source: str) -> None:
    """Replaces `function` in the loaded script `module` with the mutant's source (in its namespace)."""
    exec(compile(source, f"<mutant {function}>", "exec"), module.__dict__)
