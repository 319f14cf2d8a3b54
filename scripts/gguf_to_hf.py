"""Convert the SmolLM2 GGUF into a Hugging Face model folder (f32 safetensors + config + tokenizer).

The PyTorch reference benchmark (scripts/bench_torch.py) loads models as Hugging Face folders; the
project ships the model as assets/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-assets). This script
dequantizes it with transformers' GGUF loader (needs the `gguf` package), which also undoes
llama.cpp's Q/K row permutation, so the result is in plain HF Llama layout -- the same procedure as
shared/golden/scripts/convert_gguf.py, with which the golden fixtures were made. The tokenizer is the
one transformers builds from the GGUF metadata, saved with save_pretrained (tokenizer.json,
tokenizer_config.json, chat_template.jinja).

Usage (in the bench venv, see scripts/setup-bench-python):
  .venv-bench/bin/python scripts/gguf_to_hf.py [--gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf]
      [--out assets/SmolLM2-135M-Instruct-f32] [--check [GOLDEN_JSON]]
--check compares the result with shared/golden/smollm2_reference.json: tokenizer ids, chat template
rendering and prompt ids (all exact), and the teacher-forced logprobs of the golden greedy completions
(max abs error, tolerance 2e-3).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(gguf_path, out):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    os.makedirs(out, exist_ok=True)
    # Tied embeddings: lm_head.weight is embed_tokens.weight; store it once, as the HF repo does.
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("dtype", None)
    cfg.update(tie_word_embeddings=True, torch_dtype="float32", architectures=["LlamaForCausalLM"])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save_pretrained(out)
    n = sum(v.numel() for v in sd.values())
    print(f"gguf_to_hf: wrote {out} ({n / 1e6:.1f}M parameters, {len(sd)} tensors, "
          f"vocab {cfg['vocab_size']}, {cfg['num_hidden_layers']} layers)")


def check(out, golden_path):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    golden = json.load(open(golden_path))
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    bad_tok = sum(tok.encode(c["text"], add_special_tokens=False).ids != c["ids"] for c in golden["tokenizer_cases"])
    import jinja2
    template = jinja2.Environment().from_string(open(os.path.join(out, "chat_template.jinja")).read())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    worst = 0.0
    bad_prompt = 0
    for case in golden["generation_cases"]:
        text = template.render(messages=case["messages"], add_generation_prompt=True)
        bad_prompt += text != case["rendered_prompt"]
        bad_prompt += tok.encode(text, add_special_tokens=False).ids != case["prompt_ids"]
        ids, comp = case["prompt_ids"], case["greedy_completion_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids + comp])).logits[0].float(), -1)
        got = lp[len(ids) - 1:len(ids) - 1 + len(comp)].gather(-1, torch.tensor(comp)[:, None])[:, 0]
        worst = max(worst, (got - torch.tensor(case["completion_logprobs"])).abs().max().item())
    tol = golden["tolerance"]["logprob_abs"]
    ok = bad_tok == 0 and bad_prompt == 0 and worst <= tol
    print(f"gguf_to_hf: check vs {golden_path}: tokenizer cases wrong {bad_tok}/{len(golden['tokenizer_cases'])}, "
          f"prompts wrong {bad_prompt}/{len(golden['generation_cases'])}, "
          f"max |logprob error| {worst:.2e} (tolerance {tol}) -> {'OK' if ok else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct-f32"))
    ap.add_argument("--check", nargs="?", const=os.path.join(ROOT, "..", "shared", "golden", "smollm2_reference.json"),
                    metavar="GOLDEN_JSON", help="compare with the golden reference after converting")
    args = ap.parse_args()
    if not os.path.exists(args.gguf):
        sys.exit(f"gguf_to_hf: {args.gguf} not found (run scripts/fetch-assets first)")
    import torch
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    convert(args.gguf, args.out)
    if args.check and not check(args.out, args.check):
        sys.exit(1)


if __name__ == "__main__":
    main()
