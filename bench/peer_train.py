#!/usr/bin/env python3
"""The PyTorch + transformers + PEFT side of bench/run.sh: times LoRA training steps (all-linear, AdamW) on
random tokens with the same model directory, shapes and step count as `factune bench train`; prints one JSON
line."""
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
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    timed, loss = 0.0, None
    for step in range(a.steps + 1):
        ids = torch.randint(0, vocab, (a.batch, a.seq_len))
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            timed += time.perf_counter() - t0
        loss = out.loss.item()
    tokens = a.batch * a.seq_len * a.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"impl": "pytorch+peft", "seq_len": a.seq_len, "batch": a.batch, "r": a.r, "steps": a.steps,
                      "tokens_per_s": tokens / timed, "seconds_per_step": timed / a.steps, "peak_rss_mb": rss,
                      "loss": loss, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
