"""The runs of tests/test_distributed.py, and its worker: `torchrun --nproc_per_node 2 tests/distributed_runs.py
OUT` trains each run below on 2 processes (gloo, CPU) into OUT/<run>, the way a user's torchrun would,
while the test trains the same runs in one process with the batch doubled. Rank 1 is given its own
output folders, OUT/rank1/<run>: it must write nothing there, nor anywhere. The runs of STOPPED are stopped
after their checkpoint (both processes then read the one folder, as on a shared filesystem): "sft_resumed"
and "ppo_resumed" are resumed on 2 processes here, "sft_resharded" on 1 process by the test."""

import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Each run: (script, its arguments, the argument that the second process halves). Dropout is off in
# every toy model (and in DPO and VAR by default), so one process and two see the same function.
RUNS = {
    "sft": ("sft", dict(model="toy/sft", max_train_samples=48, max_eval_samples=8, max_steps=3, batch_size=8,
                        log_every=1, eval_every=0, num_samples=0), "batch_size"),
    "dpo": ("dpo", dict(max_train_samples=48, max_eval_samples=8, max_steps=3, batch_size=8, log_every=1,
                        reward_model="none", learning_rate=1e-4), "batch_size"),
    # AdamW's first step moves a weight by ~lr x sign(gradient): where the gradient is ~0, float noise
    # in the sum over processes moves it by a fraction of lr, so the runs take small ones
    "reward_model": ("reward_model", dict(model="toy/sft", max_train_samples=16, max_eval_samples=8,
                                          max_steps=1, batch_size=8, log_every=1, learning_rate=1e-4),
                     "batch_size"),
    # VAR's batch is one prompt's group (its normaliser), so two processes halve the accumulation
    "var": ("var", dict(train_split="train[:8]", batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                        eval_prompts="none", log_every=1), "gradient_accumulation_steps"),
    # the CUDA default, bf16 autocast, on the CPU: FSDP gathers fp32 weights, so both run the same autocast
    "sft_bf16": ("sft", dict(model="toy/sft", max_train_samples=48, max_steps=3, batch_size=8, log_every=1,
                             eval_split=None, num_samples=0, device="cpu", dtype="bfloat16"), "batch_size"),
    # stopped after step 3, resumed from the checkpoint of step 2, whose log window (steps 1-2) is open
    "sft_resumed": ("sft", dict(model="toy/sft", max_train_samples=48, max_eval_samples=8, max_steps=4,
                                batch_size=8, log_every=3, eval_every=0, save_every=2, num_samples=0),
                    "batch_size"),
    # the same, resumed on 1 process with its global batch of 8 (DCP reshards the weights and moments)
    "sft_resharded": ("sft", dict(model="toy/sft", max_train_samples=48, max_eval_samples=8, max_steps=4,
                                  batch_size=8, log_every=3, eval_every=0, save_every=2, num_samples=0),
                      "batch_size"),
}
STOPPED = ["sft_resumed", "sft_resharded"]


# PPO's processes sample with their own random streams, so a run is checked end to end, not against one
# process: 2 iterations of 2 x 4 prompts
PPO = dict(total_episodes=16, batch_size=4, minibatch_size=4, max_new_tokens=8, num_eval_prompts=4, log_every=1)
# three iterations, a checkpoint after each of the first two; the resumed twin stops at the end and resumes
# from iteration 2: the same rollouts and losses at iteration 3 (its random states came back)
PPO_RESUMED = dict(PPO, total_episodes=24, save_every=1)


def run_args(name: str, out: Path, processes: int):
    """The Args of a run, for `processes` processes (their global batch is the one-process batch)."""
    import importlib

    script, kw, halved = RUNS[name]
    module = importlib.import_module(script)
    kw = {**kw, halved: kw[halved] // processes, "output_dir": str(out / name)}
    return module, module.Args(**kw)


def whitening_check(out: Path) -> None:
    """ppo.masked_whiten on each process's half of a minibatch equals it on the whole minibatch."""
    import torch
    import torch.distributed as dist

    import ppo

    torch.manual_seed(0)
    x, mask = torch.randn(8, 5), (torch.rand(8, 5) > 0.3).float()
    rank = dist.get_rank()
    mine = ppo.masked_whiten(x[4 * rank : 4 * rank + 4], mask[4 * rank : 4 * rank + 4])
    parts = [None, None]
    dist.all_gather_object(parts, mine.tolist())
    if rank == 0:
        json.dump({"x": x.tolist(), "mask": mask.tolist(), "whitened": parts[0] + parts[1]},
                  open(out / "whitening.json", "w"))


def stopped(module, args) -> None:
    """The run killed at its end, after the final save (no eval.json: its last checkpoint stays)."""
    finish = module.finish
    module.finish = lambda *_: sys.exit("stopped")
    try:
        module.main(args)
    except SystemExit:
        pass
    module.finish = finish


if __name__ == "__main__":
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    os.chdir(ROOT)
    for name in RUNS:
        if name not in STOPPED:
            module, args = run_args(name, out if rank == 0 else out / "rank1", 2)
            module.main(args)
    whitening_check(out)
    for name in STOPPED:
        stopped(*run_args(name, out, 2))
    module, args = run_args("sft_resumed", out, 2)
    module.main(dataclasses.replace(args, resume=True))
    import ppo

    ppo.main(ppo.Args(**PPO, output_dir=str((out if rank == 0 else out / "rank1") / "ppo")))
    ppo.main(ppo.Args(**PPO_RESUMED, output_dir=str(out / "ppo_whole")))
    stopped(ppo, ppo.Args(**PPO_RESUMED, output_dir=str(out / "ppo_resumed")))
    ppo.main(ppo.Args(**PPO_RESUMED, output_dir=str(out / "ppo_resumed"), resume=True))
