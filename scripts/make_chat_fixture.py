#!/usr/bin/env python3
"""Renders chat templates with transformers' apply_chat_template (jinja2) for factune's minijinja test.

    python scripts/make_chat_fixture.py   # writes tests/fixtures/chat_templates.json
"""
import json
import os

from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(__file__)
TEMPLATES = {
    # ChatML, as Qwen2 ships it (with a default system prompt).
    "chatml": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # Llama 3 style: BOS, header tokens, trimmed content.
    "llama3": "{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # Block tags on their own lines: exercises trim_blocks / lstrip_blocks.
    "blocks": "{% for m in messages %}\n  {% if m['role'] == 'user' %}\nUser: {{ m['content'] }}\n  {% else %}\n"
              "Bot: {{ m['content'] }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n"
              "{% if add_generation_prompt %}Bot:{% endif %}",
}
MESSAGES = [{"role": "user", "content": "Where is the pen? "}, {"role": "assistant", "content": "In the drawer."},
            {"role": "user", "content": "And the boat?"}]


def main():
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(HERE, "..", "assets", "default-model", "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>")
    cases = []
    for name, template in TEMPLATES.items():
        for gen in [False, True]:
            text = tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=gen)
            cases.append({"name": name, "template": template, "add_generation_prompt": gen, "expected": text})
    out = {"bos_token": "<s>", "eos_token": "</s>", "messages": MESSAGES, "cases": cases}
    with open(os.path.join(HERE, "..", "tests", "fixtures", "chat_templates.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
