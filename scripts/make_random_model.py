"""Make a randomly initialised Hugging Face model folder with a real model's shapes, for benchmarks.

No real weights fit in what can be carried to the lent GPU machine (64 MiB), and speed does not
depend on the values: scripts/gpu-check makes these there, and both our engine and PyTorch load
the same folder. The config.json written first is the real model's (as its hub repository has it,
for Llama-3.2-1B with the llama3 RoPE scaling); transformers reads it, initialises the weights with
its own initialiser (seeded) and saves config.json + model.safetensors in bf16 (or --dtype).

  python3 scripts/make_random_model.py --shape smollm2-135m --out /tmp/models/smollm2
  python3 scripts/make_random_model.py --shape llama-3.2-1b --out /tmp/models/llama1b [--device cuda]
"""
import argparse
import json
import os
import sys

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (DESIGN.md section 2: the GGUF's facts).
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    },
    # meta-llama/Llama-3.2-1B-Instruct.
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    },
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True, help="folder to write (created; must not hold a model yet)")
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--device", default="cpu", help="where to initialise (cuda is faster for 1B)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.path.exists(os.path.join(args.out, "model.safetensors")):
        sys.exit(f"make_random_model: {args.out} already holds a model; choose another --out")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(SHAPES[args.shape], f, indent=1)
    cfg = AutoConfig.from_pretrained(args.out)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(args.out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"shape": args.shape, "out": os.path.abspath(args.out), "parameters": n,
                      "dtype": args.dtype}))


if __name__ == "__main__":
    main()
