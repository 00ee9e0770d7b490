#!/usr/bin/env python3
"""Reference fixtures for factune's numerical tests, produced by the real libraries.

    python scripts/make_fixtures.py build  [--out tests/fixtures]
        Builds tiny random-weight models in Hugging Face format (a Llama with GQA, untied embeddings, llama3
        RoPE scaling and a sharded checkpoint; a Qwen2 with q/k/v bias, tied embeddings, stored in bf16; a
        GPT-2 stored in f16), a PEFT LoRA adapter for each with non-zero B, and reference outputs for fixed
        token ids: base and adapted logits, the causal-LM loss with masked prompt tokens, the gradients of every
        LoRA A/B, and greedy generation tokens; plus DoRA adapters (Llama, GPT-2) with logits, loss and the
        gradients of A, B and the magnitude vectors.

    python scripts/make_fixtures.py verify --model DIR [--adapter ADIR] --expect FILE.safetensors
        Loads an adapter written by factune with PeftModel.from_pretrained (or, without --adapter, a checkpoint
        written by `factune merge` with transformers alone) and checks that the logits for the `input_ids` in
        FILE match the `logits` factune stored there. A 4-bit DIR (written by `factune quantize`) is loaded by
        transformers + bitsandbytes and run on bitsandbytes' dequantisation of its weights.

Pinned: torch==2.15.0 transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2 tensorly==0.10.0 safetensors (see scripts/requirements-fixtures.txt).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def set_seed(seed):
    torch.manual_seed(seed)


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        bos_token_id=1, eos_token_id=2,
    )


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, use_sliding_window=False,
    )


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


MODELS = {
    # name: (config, storage dtype, LoRA settings, shard size)
    "llama": (llama_config, torch.float32,
              dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]), "100KB"),
    "qwen2": (qwen2_config, torch.bfloat16,
              dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), None),
    "gpt2": (gpt2_config, torch.float16,
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), None),
}


def input_ids():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, 256, (2, 12), generator=g)


def build(out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "peft": __import__("peft").__version__}
    for name, (cfg_fn, dtype, lora, shard) in MODELS.items():
        set_seed(0)
        cfg = cfg_fn()
        model = AutoModelForCausalLM.from_config(cfg).eval()
        # Random init is small; widen the weights so that errors in the architecture show in the logits.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.08)
                else:
                    p.add_(torch.randn_like(p) * 0.05)
        mdir = os.path.join(out, name)
        model = model.to(dtype)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(mdir, **kwargs)
        # Reference computations run in f32 on the stored weights, as factune computes.
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()

        ids = input_ids()
        labels = ids.clone()
        labels[:, :3] = -100
        with torch.no_grad():
            base_logits = model(ids).logits

        set_seed(1)
        peft_cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **lora)
        pm = get_peft_model(model, peft_cfg)
        out_ = pm(input_ids=ids, labels=labels)
        out_.loss.backward()
        ref = {"input_ids": ids.to(torch.int64), "labels": labels.to(torch.int64),
               "base_logits": base_logits.float(), "logits": out_.logits.detach().float(),
               "loss": out_.loss.detach().reshape(1).float()}
        for pname, p in pm.named_parameters():
            if p.requires_grad:
                key = pname.replace(".default", "") + ".grad"
                ref[key] = p.grad.detach().float().contiguous()
        pm.save_pretrained(os.path.join(out, f"{name}-lora"))

        with torch.no_grad():
            prompt = ids[:1, :5]
            gen = pm.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        ref["greedy_prompt"] = prompt.to(torch.int64)
        ref["greedy_tokens"] = gen[:, 5:].to(torch.int64).contiguous()
        save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, f"{name}-reference.safetensors"))
        print(f"{name}: loss {out_.loss.item():.6f}, {sum(k.endswith('.grad') for k in ref)} LoRA gradients")
    build_dora(out)
    build_pissa(out)
    build_vera(out)
    build_adalora(out)
    build_eva(out)
    build_untyped(out)
    build_prompt(out)
    build_prompt_first_label(out)
    build_merges(out)
    build_intruders(out)
    versions["bitsandbytes"] = build_nf4(out)
    versions["tensorly"] = build_mpo(out)
    build_fastfood(out)
    with open(os.path.join(out, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=2)
        f.write("\n")


def build_dora(out):
    """DoRA adapters (random B, so the magnitude differs from ||W||) on the fixture Llama and GPT-2, with logits,
    loss and the gradients of A, B and the magnitude vector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, targets, fan in [("llama", ["q_proj", "v_proj", "down_proj"], False), ("gpt2", ["c_attn", "c_fc"], True)]:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
        ids = input_ids()
        labels = ids.clone()
        labels[:, :3] = -100
        set_seed(2)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                         use_dora=True, target_modules=targets, fan_in_fan_out=fan)
        pm = get_peft_model(model, cfg)
        # Move the magnitudes away from their init so a wrong formula cannot hide behind m = ||W + sBA||.
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_magnitude_vector" in pname:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
        o = pm(input_ids=ids, labels=labels)
        o.loss.backward()
        ref = {"input_ids": ids.clone(), "labels": labels.clone(), "logits": o.logits.detach().float(),
               "loss": o.loss.detach().reshape(1).float()}
        for pname, p in pm.named_parameters():
            if p.requires_grad:
                key = pname.replace(".default", "")
                if "lora_magnitude_vector" in key:
                    key = key.replace(".weight", "")
                ref[key + ".grad"] = p.grad.detach().float().contiguous()
        pm.save_pretrained(os.path.join(out, f"{name}-dora"))
        save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, f"{name}-dora-reference.safetensors"))
        print(f"{name}-dora: loss {o.loss.item():.6f}")


def build_vera(out):
    """VeRA on the fixture Llama and GPT-2 (one shared projection pair, saved with the adapter): lambda_b moved off
    zero and lambda_d off d_initial so the update is non-zero, with logits, loss and the gradients of every
    lambda."""
    from peft import VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, targets, fan in [("llama", ["q_proj", "v_proj", "down_proj"], False), ("gpt2", ["c_attn", "c_fc"], True)]:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
        ids = input_ids()
        labels = ids.clone()
        labels[:, :3] = -100
        set_seed(3)
        cfg = VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=targets, projection_prng_key=5,
                         save_projection=True, vera_dropout=0.0, d_initial=0.1, fan_in_fan_out=fan)
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "vera_lambda" in pname:
                    p.add_(0.5 * torch.randn_like(p))
        o = pm(input_ids=ids, labels=labels)
        o.loss.backward()
        ref = {"input_ids": ids.clone(), "labels": labels.clone(), "logits": o.logits.detach().float(),
               "loss": o.loss.detach().reshape(1).float()}
        for pname, p in pm.named_parameters():
            if p.requires_grad:
                ref[pname.replace(".default", "") + ".grad"] = p.grad.detach().float().contiguous()
        pm.save_pretrained(os.path.join(out, f"{name}-vera"))
        save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, f"{name}-vera-reference.safetensors"))
        print(f"{name}-vera: loss {o.loss.item():.6f}")


def build_adalora(out):
    """AdaLoRA on the fixture Llama: (1) logits, loss including the orthogonal regulariser, and the gradients
    of A, E, B at a state with non-zero E; (2) the rank allocator: ten steps of forward, backward and
    `update_and_allocate` (no optimizer step, so every step sees the same parameters and gradients) with a cubic
    budget from init_r = 6 to target_r = 2 between steps 2 and 8; the E masks after each step and the final
    rank pattern; the adapter saved by PEFT (resized to the rank pattern)."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llama"), dtype=torch.float32).eval()
    ids = input_ids()
    labels = ids.clone()
    labels[:, :3] = -100
    set_seed(4)
    cfg = AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, beta1=0.85,
                        beta2=0.85, orth_reg_weight=0.5, total_step=10, lora_alpha=12, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_E" in pname:
                p.normal_(0.0, 0.5)
    o = pm(input_ids=ids, labels=labels)
    o.loss.backward()
    ref = {"input_ids": ids.clone(), "labels": labels.clone(), "logits": o.logits.detach().float(),
           "loss": o.loss.detach().reshape(1).float()}
    for pname, p in pm.named_parameters():
        if p.requires_grad:
            # copies: the allocator steps below mask E in place and zero the gradients
            ref[pname.replace(".default", "") + ".grad"] = p.grad.detach().float().clone()
            ref[pname.replace(".default", "") + ".value"] = p.detach().float().clone()
    for step in range(10):
        pm.zero_grad()
        o = pm(input_ids=ids, labels=labels)
        o.loss.backward()
        pm.base_model.update_and_allocate(step)
        total = 0
        for pname, p in pm.named_parameters():
            if "lora_E" in pname:
                total += int((p != 0).sum())
        ref[f"rank_after_step{step}"] = torch.tensor([total], dtype=torch.int64)
    for pname, p in pm.named_parameters():
        if "lora_E" in pname:
            ref[pname.replace(".default", "") + ".final"] = p.detach().float().clone()
    pm.save_pretrained(os.path.join(out, "llama-adalora"))
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, "llama-adalora-reference.safetensors"))
    print(f"llama-adalora: final rank {int(ref['rank_after_step9'][0])}")


def build_eva(out):
    """EVA on the fixture Llama from one batch (PEFT cycles it until the components converge, which from one
    batch is the PCA of that batch's layer inputs at labelled positions): rho = 2 rank redistribution, scaling
    adjusted; the initialised lora_A of every module and the resulting rank and alpha patterns."""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llama"), dtype=torch.float32).eval()
    set_seed(6)
    ids = torch.randint(0, 256, (4, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.99), target_modules=["q_proj", "o_proj", "down_proj"])
    pm = get_peft_model(model, cfg, low_cpu_mem_usage=True)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    initialize_lora_eva_weights(pm, dataloader=[batch], show_progress_bar=False)
    ref = {"input_ids": ids.clone(), "labels": labels.clone()}
    for pname, p in pm.named_parameters():
        if "lora_A" in pname:
            ref[pname.replace(".default", "")] = p.detach().float().clone()
    c = pm.peft_config["default"]
    with open(os.path.join(out, "llama-eva-patterns.json"), "w") as f:
        json.dump({"rank_pattern": c.rank_pattern, "alpha_pattern": c.alpha_pattern}, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "llama-eva-reference.safetensors"))
    print(f"llama-eva: rank_pattern {c.rank_pattern}")


def build_pissa(out):
    """PiSSA (exact SVD) on the fixture Llama: the init (s·B0A0 and the residual weight per module), then factors
    moved as if trained, with logits, loss and gradients; saved natively and converted to a rank-2r LoRA."""
    import tempfile
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    name = "llama"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
    ids = input_ids()
    labels = ids.clone()
    labels[:, :3] = -100
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa",
                     target_modules=["q_proj", "v_proj", "down_proj"])
    pm = get_peft_model(model, cfg)
    ref = {"input_ids": ids.clone(), "labels": labels.clone()}
    for mname, m in pm.named_modules():
        if isinstance(m, LoraLayer):
            path = mname.replace("base_model.model.", "", 1)
            a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
            ref[f"{path}.init_delta"] = (s * b @ a).detach().contiguous()
            ref[f"{path}.residual"] = m.base_layer.weight.detach().clone().contiguous()
    init_dir = tempfile.mkdtemp()
    pm.save_pretrained(init_dir)
    set_seed(3)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    o = pm(input_ids=ids, labels=labels)
    o.loss.backward()
    ref.update({"logits": o.logits.detach().float(), "loss": o.loss.detach().reshape(1).float()})
    for pname, p in pm.named_parameters():
        if p.requires_grad:
            ref[pname.replace(".default", "") + ".grad"] = p.grad.detach().float().contiguous()
    pm.save_pretrained(os.path.join(out, f"{name}-pissa"))
    conv = os.path.join(out, f"{name}-pissa-converted")
    pm.save_pretrained(conv, path_initial_model_for_weight_conversion=init_dir)
    # The converted adapter on the untouched base must reproduce the trained PiSSA model.
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
    with torch.no_grad():
        d = (PeftModel.from_pretrained(base, conv)(input_ids=ids).logits - ref["logits"]).abs().max().item()
    assert d < 1e-4, d
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, f"{name}-pissa-reference.safetensors"))
    print(f"{name}-pissa: loss {o.loss.item():.6f}; converted adapter reproduces it within {d:.1e}")


def build_untyped(out):
    """A LoRA saved with no task_type (a bare PeftModel): PEFT writes `"task_type": null` beside its other null
    optional fields; the adapter's logits on the fixture Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    name = "llama"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
    ids = input_ids()
    set_seed(4)
    cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "o_proj"])
    pm = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        logits = pm(input_ids=ids).logits.float()
    adir = os.path.join(out, f"{name}-untyped")
    pm.save_pretrained(adir)
    with open(os.path.join(adir, "adapter_config.json")) as f:
        assert json.load(f)["task_type"] is None
    save_file({"input_ids": ids.clone(), "logits": logits.contiguous()},
              os.path.join(out, f"{name}-untyped-reference.safetensors"))
    print(f"{name}-untyped: adapter with task_type null")


MERGE_SOURCES = {
    # name: LoRA settings on the fixture Llama (random non-zero B; "e" and "f" are DoRA)
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
    "c": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "d": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
    "e": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "f": dict(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"], use_dora=True),
}

MERGES = [
    # (name, sources, combination_type, weights, keyword arguments of add_weighted_adapter)
    ("linear", "ab", "linear", [0.7, 0.5], {}),
    ("linear-negative", "ab", "linear", [0.8, -0.4], {}),
    ("cat", "ab", "cat", [0.7, 0.5], {}),
    ("ties", "ab", "ties", [0.7, 0.5], {"density": 0.5}),
    ("ties-frequency", "ab", "ties", [0.7, -0.5], {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", "magnitude_prune", [0.7, 0.5], {"density": 0.4}),
    ("cat-ranks", "cd", "cat", [1.0, 0.6], {}),
    ("svd", "cd", "svd", [1.0, 0.6], {}),
    # no svd_clamp: clamping at a quantile of the entries depends on the SVD's sign choices (LAPACK's here)
    ("svd-rank", "cd", "svd", [1.0, -0.6], {"svd_rank": 3}),
    ("ties_svd", "cd", "ties_svd", [1.0, 0.6], {"density": 0.5}),
    ("magnitude_prune_svd", "cd", "magnitude_prune_svd", [1.0, 0.6], {"density": 0.5}),
    ("dora-linear", "ef", "linear", [0.7, 0.5], {}),
    ("dora-cat", "ef", "cat", [0.7, 0.5], {}),
]


def build_merges(out):
    """PEFT's add_weighted_adapter on saved LoRA/DoRA adapters of the fixture Llama, for every deterministic
    combination_type: each source adapter as a directory, and per merge its tensors (`NAME/KEY`) and the loss
    of the base with it. The sources' scalings differ from 1 (and from each other), so a scaling folded in
    wrongly shows."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    mdir = os.path.join(out, "llama")
    ids = input_ids()
    labels = ids.clone()
    labels[:, :3] = -100
    for i, (name, lora) in enumerate(MERGE_SOURCES.items()):
        set_seed(20 + i)
        base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **lora)
        pm = get_peft_model(base, cfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_magnitude_vector" in pname:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
        pm.peft_config["default"].init_lora_weights = True  # as a trained adapter's config says
        pm.save_pretrained(os.path.join(out, f"llama-merge-{name}"))
    ref = {"input_ids": ids.clone(), "labels": labels.clone()}
    for name, sources, combination, weights, kwargs in MERGES:
        base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
        pm = PeftModel.from_pretrained(base, os.path.join(out, f"llama-merge-{sources[0]}"), adapter_name=sources[0])
        for s in sources[1:]:
            pm.load_adapter(os.path.join(out, f"llama-merge-{s}"), adapter_name=s)
        pm.add_weighted_adapter(list(sources), weights, name, combination_type=combination, **kwargs)
        pm.set_adapter(name)
        pm.eval()
        with torch.no_grad():
            loss = pm(input_ids=ids, labels=labels).loss
        ref[f"{name}/loss"] = loss.reshape(1).float()
        for k, v in get_peft_model_state_dict(pm, adapter_name=name).items():
            ref[f"{name}/{k}"] = v.detach().float().contiguous()
        print(f"merge {name}: {combination} of {sources}, loss {loss.item():.6f}")
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, "llama-merge-reference.safetensors"))


INTRUDER_SETTINGS = dict(top_k=6, threshold_epsilon=0.5, mitigation_lambda=0.3)


def build_intruders(out):
    """PEFT's reduce_intruder_dimension on the merge source `a` (LoRA r=4 on q/v), its B scaled per layer (from
    ×0.02 to ×40) so the update brings new directions into the top singular vectors of some layers, not all.
    The adapter as analysed is saved (`llama-intruders`); the reference holds, per layer, the |cos| of each of
    the tuned weight's top-k left singular vectors with the base's (`MODULE/similarity`), the intruder count
    PEFT reported, the singular values of ΔW (`MODULE/delta_singular_values`), and the reduced adapter's tensors (`reduced/KEY`)."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    mdir = os.path.join(out, "llama")
    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(base, os.path.join(out, "llama-merge-a"))
    with torch.no_grad():
        for i, (name, p) in enumerate(n for n in pm.named_parameters() if "lora_B" in n[0]):
            p.mul_([40.0, 0.02, 3.0, 0.5][i])
    adir = os.path.join(out, "llama-intruders")
    pm.save_pretrained(adir)
    ref = {}
    s = INTRUDER_SETTINGS
    for name, layer in pm.named_modules():
        if isinstance(layer, LoraLayer):
            w = layer.get_base_layer().weight.data
            u0 = torch.linalg.svd(w, full_matrices=False)[0]
            u1 = torch.linalg.svd(w + layer.get_delta_weight("default"), full_matrices=False)[0]
            sim = (u1.T @ u0).abs().max(dim=1).values[: s["top_k"]]
            module = name.removeprefix("base_model.model.")
            ref[f"{module}/similarity"] = sim.float().contiguous()
            ref[f"{module}/delta_singular_values"] = torch.linalg.svdvals(layer.get_delta_weight("default")).float()
    lines = []
    reduce_intruder_dimension(pm, **s, logging_sink=lines.append)
    for line in lines:
        if ": Intruders: " in line:
            module, n = line.split(": Intruders: ")
            ref[f"{module.removeprefix('base_model.model.')}/intruders"] = torch.tensor([int(n)])
    for k, v in get_peft_model_state_dict(pm, adapter_name="intruder_reduced").items():
        ref[f"reduced/{k}"] = v.detach().float().contiguous()
    counts = {k: int(v) for k, v in ref.items() if k.endswith("/intruders")}
    print(f"intruders: {len(counts)} layers with intruders: {counts}")
    save_file(ref, os.path.join(out, "llama-intruders-reference.safetensors"))


def build_nf4(out):
    """NF4 codes and scales from bitsandbytes, plain and double-quantised, for three matrices: whole blocks; an odd element count with a
    partial last block; and heavy tails spanning two double-quantisation groups. The dequantised references use
    bitsandbytes' portable formula (`_dequantize_4bit_compute`, the CUDA/default path): its C kernel for CPUs
    without AVX-512 decodes differently (max error 0.11 vs 0.023 on N(0, 0.05²) data, bitsandbytes 0.50.2), so
    it is not used as the reference."""
    import bitsandbytes
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    set_seed(7)
    mats = {"a": torch.randn(48, 160) * 0.05, "b": torch.randn(37, 41) * 0.02,
            "c": torch.distributions.StudentT(3.0).sample((257, 64)) * 0.02}
    ref = {}
    for name, w in mats.items():
        ref[f"{name}.weight"] = w
        q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        ref[f"{name}.codes"] = q.reshape(-1)
        ref[f"{name}.absmax"] = st.absmax
        q2, st2 = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(q, q2)
        ref[f"{name}.dq.absmax"] = st2.absmax
        ref[f"{name}.dq.nested_absmax"] = st2.state2.absmax
        ref[f"{name}.dq.nested_quant_map"] = st2.state2.code
        ref[f"{name}.dq.offset"] = st2.offset.reshape(1)
        absmax = F.dequantize_blockwise(st2.absmax, st2.state2) + st2.offset
        ref[f"{name}.dequant"] = _dequantize_4bit_compute(q.reshape(-1), absmax, st.code, 64, w.shape,
                                                          torch.float32)
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, os.path.join(out, "nf4-reference.safetensors"))
    print(f"nf4: bitsandbytes {bitsandbytes.__version__}, {len(mats)} matrices")
    return bitsandbytes.__version__


def dense_from_4bit(model_dir):
    """A 4-bit checkpoint as transformers + bitsandbytes load it, with every `Linear4bit` replaced by an f32
    `nn.Linear` holding bitsandbytes' own dequantisation of the stored weight (`dequantize_4bit`). The
    `Linear4bit` forward itself is not used: on this CPU (AVX2, bitsandbytes 0.50.2) it disagrees with the
    library's own dequantised weights by up to 14 in the logits of the same model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = F.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                lin.weight.data = w
                if child.bias is not None:
                    lin.bias.data = child.bias.data.float()
                setattr(mod, name, lin)
    for p in list(m.parameters()) + list(m.buffers()):
        p.data = p.data.float()
    return m.eval()


def build_fastfood(out):
    """SAID's Fastfood projection (Aghajanyan et al. 2021) written from its definition in torch, float64:
    P theta = S H G Pi H B theta / (sqrt(L sum G^2) sqrt(D / L)), theta zero-padded to L = 2^ceil(log2 max(d, D)).
    The random parts are drawn by torch and saved with the result, and torch autograd gives P^T g (the
    gradient of <P theta, g>), so factune's transform, handed the same parts, is checked both ways."""
    set_seed(5)

    def hadamard(x):
        n, h = x.shape[0], 1
        while h < n:
            y = x.reshape(-1, 2, h)
            x = torch.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), dim=1).reshape(n)
            h *= 2
        return x

    ref = {}
    for name, (d, dd) in {"narrow": (10, 300), "wide": (700, 5000), "square": (64, 64)}.items():
        ll = 1 << (max(d, dd) - 1).bit_length()
        signs = torch.randint(0, 2, (d,), dtype=torch.float64) * 2 - 1
        perm = torch.randperm(ll)
        gauss = torch.randn(ll, dtype=torch.float64)
        theta = torch.randn(d, dtype=torch.float64, requires_grad=True)
        g = torch.randn(dd, dtype=torch.float64)
        x = torch.nn.functional.pad(theta * signs, (0, ll - d))
        x = hadamard(hadamard(x)[perm] * gauss)
        y = x[:dd] / (torch.sqrt(ll * torch.sum(gauss ** 2)) * (dd / ll) ** 0.5)
        (y * g).sum().backward()
        for k, v in {"signs": signs, "gauss": gauss, "theta": theta.detach(), "g": g, "out": y.detach(),
                     "grad": theta.grad}.items():
            ref[f"{name}.{k}"] = v.float().contiguous()
        ref[f"{name}.perm"] = perm.to(torch.int64).contiguous()
    save_file(ref, os.path.join(out, "fastfood-reference.safetensors"))
    print(f"fastfood: torch {torch.__version__}")


def build_mpo(out):
    """TT-SVD references from tensorly: a [24, 36] matrix split into modes (4, 3, 2) x (4, 3, 3), reordered to
    M[(j1 i1), (j2 i2), (j3 i3)], decomposed by `tensorly.decomposition.tensor_train` with every bond capped at
    chi, and the reconstruction mapped back to [24, 36]. The truncated reconstruction is unique (distinct
    singular values), so it is compared directly, free of the cores' gauge freedom."""
    import tensorly
    from tensorly.decomposition import tensor_train

    set_seed(11)
    w = torch.randn(24, 36, dtype=torch.float64)
    jo, io = (4, 3, 2), (4, 3, 3)
    m = w.reshape(*jo, *io).permute(0, 3, 1, 4, 2, 5).reshape(16, 9, 6).numpy()
    ref = {"weight": w.float()}
    for chi in (1, 2, 4, 8, 64):
        tt = tensor_train(m, rank=[1, min(chi, 16), min(chi, 6), 1])
        back = torch.from_numpy(tensorly.tt_to_tensor(tt)).reshape(4, 4, 3, 3, 2, 3)
        ref[f"chi{chi}"] = back.permute(0, 2, 4, 1, 3, 5).reshape(24, 36).float()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "mpo-reference.safetensors"))
    print(f"mpo: tensorly {tensorly.__version__}")
    return tensorly.__version__


def build_prompt(out):
    """The prompt family on the fixture Llama (GQA) and GPT-2: prompt tuning, P-tuning (MLP and LSTM encoders) and prefix
    tuning with and without the projection, each with logits of the real tokens, the loss with masked prompt
    tokens, the gradients of every trainable tensor (encoder included, under `prompt_encoder.<name>`) and greedy
    generation (the KV cache carries the prefix). The saved adapter holds PEFT's `prompt_embeddings`."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    n = 4
    methods = {
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
        "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=32),
        "ptuning-lstm": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=16,
                                                    encoder_reparameterization_type="LSTM"),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
        "prefix-proj": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                  prefix_projection=True, encoder_hidden_size=32),
    }
    for name in ["llama", "gpt2"]:
        for mname, make in methods.items():
            model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
            ids = input_ids()
            labels = ids.clone()
            labels[:, :3] = -100
            set_seed(4)
            pm = get_peft_model(model, make())
            with torch.no_grad():
                for pname, p in pm.named_parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.5 if p.dim() == 2 and "embedding" in pname else 0.2)
            o = pm(input_ids=ids, labels=labels)
            o.loss.backward()
            t = ids.shape[1]
            ref = {"input_ids": ids.clone(), "labels": labels.clone(),
                   "logits": o.logits[:, -t:].detach().float().contiguous(),
                   "loss": o.loss.detach().reshape(1).float()}
            for pname, p in pm.named_parameters():
                if p.requires_grad:
                    key = pname.replace("prompt_encoder.default.", "prompt_encoder.")
                    ref[key] = p.detach().float().contiguous()
                    ref[key + ".grad"] = p.grad.detach().float().contiguous()
            with torch.no_grad():
                prompt = ids[:1, :5]
                gen = pm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
            ref["greedy_prompt"] = prompt.clone()
            ref["greedy_tokens"] = gen[:, 5:].to(torch.int64).contiguous()
            pm.save_pretrained(os.path.join(out, f"{name}-{mname}"))
            save_file({k: v.clone().contiguous() for k, v in ref.items()},
                      os.path.join(out, f"{name}-{mname}-reference.safetensors"))
            print(f"{name}-{mname}: loss {o.loss.item():.6f}, greedy {ref['greedy_tokens'].tolist()}")



def build_prompt_first_label(out):
    """The loss PEFT gives the saved prompt-tuning and P-tuning adapters when every label is kept: the last
    virtual token's logits then predict the first real token, and PEFT counts that prediction."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ["llama", "gpt2"]:
        for mname in ["prompt", "ptuning"]:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
            pm = PeftModel.from_pretrained(model, os.path.join(out, f"{name}-{mname}")).eval()
            ids = input_ids()
            with torch.no_grad():
                loss = pm(input_ids=ids, labels=ids.clone()).loss
            save_file({"input_ids": ids.clone(), "labels": ids.clone(), "loss": loss.reshape(1).float()},
                      os.path.join(out, f"{name}-{mname}-unmasked-reference.safetensors"))
            print(f"{name}-{mname}: loss with every label {loss.item():.6f}")

def verify(model_dir, adapter_dir, expect):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exp = load_file(expect)
    with open(os.path.join(model_dir, "config.json")) as f:
        four_bit = "quantization_config" in json.load(f)
    if four_bit:
        base = dense_from_4bit(model_dir)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(base, adapter_dir).eval() if adapter_dir else base
    with torch.no_grad():
        logits = pm(input_ids=exp["input_ids"].long()).logits.float()
    # prompt tuning returns the virtual tokens' logits too: compare the real tokens'
    logits = logits[:, -exp["logits"].shape[1]:]
    diff = (logits - exp["logits"]).abs().max().item()
    what = f"PEFT loaded {adapter_dir}" if adapter_dir else f"transformers loaded {model_dir}"
    print(f"{what}: max |logits(python) - logits(factune)| = {diff:.3e}")
    if diff > 1e-4:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    only = {
        "build": (build, "every fixture"),
        "build-nf4": (build_nf4, "only the bitsandbytes NF4 fixture"),
        "build-eva": (build_eva, "only the PEFT EVA fixture"),
        "build-adalora": (build_adalora, "only the PEFT AdaLoRA fixture"),
        "build-vera": (build_vera, "only the PEFT VeRA fixtures"),
        "build-untyped": (build_untyped, "only the PEFT adapter with task_type null"),
        "build-prompt": (build_prompt, "only the PEFT prompt-family fixtures"),
        "build-prompt-first-label": (build_prompt_first_label, "only the prompt-tuning losses with every label"),
        "build-merges": (build_merges, "only the PEFT add_weighted_adapter fixtures"),
        "build-intruders": (build_intruders, "only the PEFT reduce_intruder_dimension fixture"),
        "build-mpo": (build_mpo, "only the tensorly TT-SVD fixture"),
        "build-fastfood": (build_fastfood, "only the torch Fastfood (SAID) fixture"),
    }
    for cmd, (_, help_) in only.items():
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    v = sub.add_parser("verify")
    v.add_argument("--model", required=True)
    v.add_argument("--adapter")
    v.add_argument("--expect", required=True)
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if a.cmd in only:
        only[a.cmd][0](a.out)
    else:
        verify(a.model, a.adapter, a.expect)


if __name__ == "__main__":
    main()
