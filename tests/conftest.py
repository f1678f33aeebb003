"""Shared test setup: offline, quiet, the repository root importable, toy fixtures built once."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before anything imports transformers or datasets: no hub, caches in a throwaway folder.
_cache = tempfile.mkdtemp(prefix="minialign-tests-")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_HOME"] = os.environ.get("HF_HOME", os.path.join(_cache, "hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

TOY = ROOT / "toy"


def toy_prompts(split: str = "test") -> list:
    """The toy's prompt set: lists with one user message."""
    import json

    return [json.loads(line)["prompt"] for line in open(TOY / "data" / "prompts" / f"{split}.jsonl")]


def prompt_file(path: Path) -> list:
    """Writes 8 toy test prompts, the third made four times longer, to the .jsonl file `path`, and returns
    the 6 a run keeps with --prompts_split train --num_prompts 7 --max_prompt_length 20 (each of these
    off its default): the long one dropped, the eighth never read."""
    import json

    rows = toy_prompts("test")[10:18]
    rows[2] = [{"role": "user", "content": " ".join([rows[2][0]["content"]] * 4)}]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return rows[:2] + rows[3:7]


@pytest.fixture(scope="session")
def doubled_rm(tmp_path_factory) -> str:
    """toy/rm with its score head doubled: a reward model other than every default, its scores known."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("doubled_rm")
    model = AutoModelForSequenceClassification.from_pretrained(TOY / "rm")
    with torch.no_grad():
        model.score.weight.mul_(2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOY / "rm").save_pretrained(path)
    return str(path)


PROMPT_FILE_ARGS = dict(prompts_split="train", num_prompts=7, max_prompt_length=20)


@torch.no_grad()
def sample_responses(model_dir, prompts: list, seed: int = 0, temperature: float = 1.0,
                     max_new_tokens: int = 48) -> list:
    """Pure sampling from a causal LM for chat prompts, batched with left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    responses = []
    for i in range(0, len(prompts), 128):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + 128]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return responses


@pytest.fixture(scope="session")
def sft_samples():
    """512 responses of the committed toy/sft to the test prompts (each prompt twice), temperature 1."""
    prompts = (toy_prompts("test") * 2)[:512]
    return prompts, sample_responses(TOY / "sft", prompts)


@pytest.fixture(scope="session")
def tier(tmp_path_factory):
    """The real-like tier (tests/real_like.py), with pad == eos and with a separate pad: {pad: paths}."""
    import real_like

    root = tmp_path_factory.mktemp("real_like")
    return {pad: real_like.build(TOY, root / pad, pad) for pad in ("eos", "separate")}
