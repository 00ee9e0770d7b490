#!/usr/bin/env python3
"""The PyTorch + transformers + PEFT side of `factune bench infer`: a LoRA adapter (r, all-linear, random B)
merged into the same random-weight model, then greedy generation on random prompts with the KV cache; prefill
tokens/s (one forward over the prompts) and decode tokens/s (the other new tokens, one forward each), best of
`reps` after a warm-up. Prints one JSON line."""
import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules="all-linear",
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    model = model.merge_and_unload().eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (a.batch, a.prompt_len))
    best_prefill, best_decode = float("inf"), float("inf")
    with torch.inference_mode():
        for rep in range(a.reps + 1):
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(a.new_tokens - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            decode = time.perf_counter() - t1
            if rep > 0:
                best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"impl": "pytorch+peft", "batch": a.batch, "prompt_len": a.prompt_len,
                      "new_tokens": a.new_tokens, "r": a.r,
                      "prefill_tokens_per_s": a.batch * a.prompt_len / best_prefill,
                      "decode_tokens_per_s": a.batch * (a.new_tokens - 1) / best_decode,
                      "peak_rss_mb": rss, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
