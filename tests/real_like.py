"""The real-like tier of the toy: toy/sft and toy/rm dressed as an instruction-tuned chat checkpoint.

Real chat checkpoints set traps the clean toy cannot: text after the end-of-turn token, pad == eos,
dropout in the config, a generation_config.json whose sampling settings `generate` would inherit, a
list of stop ids, and a tokenizer that adds BOS while its chat template writes it too. `build` makes
a copy of the toy's policy and reward model with every one of them, in a second or so:

- the ChatML shape `<|role|>content<|im_end|>\\n`: each turn ends with `<|im_end|>` (the toy's end
  token, id 2, renamed) followed by a newline, so the rendered response continues past its EOS. The
  role markers stay the toy's own tokens, so the toy model is still on the distribution it learned;
- `eos_token` is `<|im_end|>`; pad is that same token (`pad="eos"`, the common real case) or the toy's
  `<|pad|>` (`pad="separate"`); neither config carries `pad_token_id`;
- `attention_dropout: 0.1` (the only dropout field a Llama config has);
- generation_config.json with do_sample, temperature 0.3, top_k 5, top_p 0.5, repetition_penalty 1.3
  and `eos_token_id` [2, 3]: id 3 is a second end token, `<|endoftext|>`, whose embedding row is made
  equal to `<|im_end|>`'s, so the (tied) model ends about half its responses with it;
- a post-processor that prepends `<|bos|>` to whatever is tokenised with special tokens, while the
  template starts with `{{ bos_token }}` too.
"""

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

EOS, SECOND_STOP, BOS, PAD = 2, 3, 1, 0
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.5,
                     "repetition_penalty": 1.3, "eos_token_id": [EOS, SECOND_STOP], "max_new_tokens": 7,
                     "bos_token_id": BOS}


def dress(src: Path, dst: Path, pad: str) -> None:
    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (dst / name).read_text().replace('"<|end|>"', '"<|im_end|>"')
        (dst / name).write_text(text.replace('"<|system|>"', '"<|endoftext|>"'))
    tokenizer = json.loads((dst / "tokenizer.json").read_text())
    bos, a, b = ({"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}})
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, a], "pair": [bos, a, b],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [BOS], "tokens": ["<|bos|>"]}}}
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    tokenizer_config["pad_token"] = "<|im_end|>" if pad == "eos" else "<|pad|>"
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (dst / "chat_template.jinja").write_text(TEMPLATE)

    config = json.loads((dst / "config.json").read_text())
    config.update(attention_dropout=0.1, pad_token_id=None, eos_token_id=EOS)
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    (dst / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=1))

    weights = load_file(dst / "model.safetensors")
    for name, tensor in weights.items():
        if "embed_tokens" in name or "lm_head" in name:
            tensor[SECOND_STOP] = tensor[EOS]  # a twin of the EOS: the model stops on either
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})


def build(toy: Path, out: Path, pad: str) -> dict:
    """out/sft and out/rm: the toy's policy and reward model as a real-like chat checkpoint."""
    assert pad in ("eos", "separate")
    dress(toy / "sft", out / "sft", pad)
    dress(toy / "rm", out / "rm", pad)
    return {"sft": str(out / "sft"), "rm": str(out / "rm")}
