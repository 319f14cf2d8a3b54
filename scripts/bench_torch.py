"""PyTorch reference benchmark for the SmolLM2 shape (DESIGN.md section 9, "Numbers to reach").

Measures what transformers + PEFT do on this CPU, so our candle engine can be compared with it in the
same run on the same machine:
  (a) matmul 2048^3, f32 and bf16, GFLOP/s (the peaks that model FLOP utilisation is measured against);
  (b) sampler: model.generate, batch 1, 8, 32, 150-token random prompts, exactly 128 new tokens per row
      (do_sample, temperature 1, no top-k/top-p, min_new_tokens = max_new_tokens): new tokens/s;
  (c) teacher-forced logprobs of 16 sequences x 300 tokens (forward + log-softmax gather of the
      targets, as TRL's selective_log_softmax): tokens/s = 16*300/time;
  (d) one GRPO-style LoRA step (r 8, alpha 16, q,k,v,o,gate,up,down via PEFT) on 16 x 300 tokens in
      4 micro-batches of 4: forward, loss = -mean(logprob(target) * advantage) with random
      advantages, backward, AdamW step: seconds per step;
  (e) peak RSS of the process (getrusage ru_maxrss) after all of them.
Each timed measure runs once as warm-up, then --repeats times; the median is reported.

--dtype f32: model weights and compute in float32.
--dtype bf16: sampling and scoring with the weights in bfloat16; the training step keeps f32 weights
  (and f32 LoRA + AdamW state) under torch.autocast(cpu, bfloat16), as TRL does with bf16=True.

Model FLOP utilisation (mfu) = counted FLOPs / time / measured matmul peak of the compute dtype. FLOPs
of a forward pass over T tokens:
    F_fwd = T * (2 * N + 4 * layers * hidden * ctx + 2 * hidden * vocab)
  N     = non-embedding parameters (all weights except the tied embedding / lm_head matrix),
  4 * layers * hidden * ctx = attention scores QK^T plus the weighted sum AV (2 FLOPs per multiply-add
          each, over all heads: heads * head_dim = hidden) against ctx attended positions,
  ctx   = attended context: (L + 1) / 2 on average for a causal pass over L tokens; for decoding, the
          current length (prompt + tokens generated so far),
  2 * hidden * vocab = the lm_head projection.
  Sampling counts the prefill of the prompts plus every decode step; a training step counts 3 x F_fwd
  (forward + backward ~ 2 x forward), the usual convention (LoRA's backward actually skips the frozen
  weights' gradients, so this flatters PyTorch a little).

--device cuda (or cuda:N): the same measures on a GPU (every timing ends with
torch.cuda.synchronize(); the training step's autocast is on "cuda"; peak GPU memory is reported beside
the process RSS). scripts/gpu-check runs it that way beside our engine.

Threads: --threads N calls torch.set_num_threads(N). Run with OMP_WAIT_POLICY=passive (this script
sets it if unset, before torch is imported) so idle OpenMP workers sleep instead of spinning: with 2
cores shared between processes, spinning workers steal the CPU from the other side of a comparison.

Usage (venv from scripts/setup-bench-python, model folder from scripts/gguf_to_hf.py):
  .venv-bench/bin/python scripts/bench_torch.py --model-dir assets/SmolLM2-135M-Instruct-f32 \\
      --dtype f32 --threads 2 --json
  --quick: small sizes (a smoke test taking well under a minute of work); --only a,b,...: a subset
  of matmul,sample,score,train.
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (OpenMP init)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURES = ("matmul", "sample", "score", "train")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


DEVICE = torch.device("cpu")


def sync():
    """Waits for the work queued on DEVICE (a GPU runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def log(msg):
    print(f"[bench_torch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn, repeats, label):
    """One warm-up call, then `repeats` timed calls; returns (median seconds, all timings)."""
    t0 = time.perf_counter()
    fn()
    sync()
    log(f"{label}: warm-up {time.perf_counter() - t0:.2f} s")
    times = []
    for i in range(repeats):
        gc.collect()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        log(f"{label}: run {i + 1}/{repeats} {times[-1]:.2f} s")
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------- FLOPs
class Shape:
    def __init__(self, model):
        cfg = model.config
        self.layers, self.hidden, self.vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
        self.n_nonemb = sum(p.numel() for n, p in model.named_parameters()
                            if "embed_tokens" not in n and "lm_head" not in n and "lora_" not in n)

    def per_token(self, ctx):
        return 2 * self.n_nonemb + 4 * self.layers * self.hidden * ctx + 2 * self.hidden * self.vocab

    def causal_pass(self, batch, length):
        """Forward over `batch` sequences of `length` tokens (causal: average ctx (L+1)/2)."""
        return batch * length * self.per_token((length + 1) / 2)

    def generate(self, batch, prompt, new):
        """Prefill of the prompt, then one decode step per new token after the first (the first new
        token comes from the prefill logits); step i attends to prompt + i positions."""
        decode = sum(self.per_token(prompt + i) for i in range(1, new))
        return self.causal_pass(batch, prompt) + batch * decode


# ------------------------------------------------------------------------------------------- measures
def bench_matmul(n, repeats, min_seconds=0.5):
    """C = A @ B, n x n x n. Each timed call runs `iters` products back to back (into a preallocated
    C), with iters chosen so a call takes >= min_seconds: one product alone is too short to time."""
    out = {"n": n}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        a, b, c = (torch.randn(n, n, dtype=dt, device=DEVICE), torch.randn(n, n, dtype=dt, device=DEVICE),
                   torch.empty(n, n, dtype=dt, device=DEVICE))
        torch.mm(a, b, out=c)  # first call: library and kernel setup
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        iters = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-4)))

        def run():
            for _ in range(iters):
                torch.mm(a, b, out=c)

        secs, _ = timed(run, repeats, f"matmul {name} {n}^3 x {iters}")
        out[f"{name}_gflops"] = 2 * n ** 3 * iters / secs / 1e9
        out[f"{name}_seconds_per_product"] = secs / iters
    return out


def selective_log_softmax(logits, index):
    """log_softmax(logits)[..., index] without materialising the full log-softmax (as TRL does)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # row by row: less memory
        return picked - lse
    return torch.stack([torch.log_softmax(row, dim=-1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
                        for row, i in zip(logits, index)])


def token_logprobs(model, ids):
    """Logprob of ids[:, 1:] under the model (teacher forcing)."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    return selective_log_softmax(logits, ids[:, 1:])


def random_ids(gen, batch, length, vocab):
    # ids 0..16 are special tokens; drawn on the CPU (same ids on every device), then moved.
    return torch.randint(17, vocab, (batch, length), generator=gen).to(DEVICE)


def bench_sample(model, shape, gen, batches, prompt, new, repeats, repeats_last, peak):
    out = {}
    for k, b in enumerate(batches):
        ids = random_ids(gen, b, prompt, shape.vocab)

        def run():
            with torch.inference_mode():
                res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new,
                                     max_new_tokens=new, pad_token_id=2, eos_token_id=2)
            assert res.shape == (b, prompt + new), res.shape

        reps = repeats_last if k == len(batches) - 1 else repeats
        secs, times = timed(run, reps, f"sample batch {b}")
        flops = shape.generate(b, prompt, new)
        out[f"batch_{b}"] = {"new_tok_per_s": b * new / secs, "seconds": secs, "repeats": reps,
                             "gflop": flops / 1e9, "mfu": flops / secs / peak}
    out.update(prompt_tokens=prompt, new_tokens=new)
    return out


def bench_score(model, shape, gen, n_seq, length, micro, repeats, peak):
    ids = random_ids(gen, n_seq, length, shape.vocab)

    def run():
        with torch.inference_mode():
            lp = torch.cat([token_logprobs(model, ids[i:i + micro]) for i in range(0, n_seq, micro)])
        assert lp.shape == (n_seq, length - 1) and torch.isfinite(lp).all()

    secs, _ = timed(run, repeats, f"score {n_seq}x{length} (micro-batch {micro})")
    flops = shape.causal_pass(n_seq, length)
    return {"tok_per_s": n_seq * length / secs, "seconds": secs, "sequences": n_seq, "length": length,
            "micro_batch": micro, "gflop": flops / 1e9, "mfu": flops / secs / peak}


def bench_train(model_dir, gen, n_seq, length, n_micro, dtype, repeats, peak):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    shape = Shape(base)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = random_ids(gen, n_seq, length, shape.vocab)
    adv = torch.randn(n_seq, generator=gen).to(DEVICE)
    micro = n_seq // n_micro
    autocast = dtype == "bf16"

    def run():
        for i in range(0, n_seq, micro):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                lp = token_logprobs(model, ids[i:i + micro])
            loss = -(lp.float() * adv[i:i + micro, None]).mean() / n_micro
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs, _ = timed(run, repeats, f"train step {n_seq}x{length} in {n_micro} micro-batches")
    flops = 3 * shape.causal_pass(n_seq, length)
    n_train = sum(p.numel() for p in params)
    del model, base, opt
    gc.collect()
    return {"seconds_per_step": secs, "tok_per_s": n_seq * length / secs, "sequences": n_seq, "length": length,
            "micro_batches": n_micro, "lora_params": n_train, "autocast_bf16": autocast,
            "gflop": flops / 1e9, "mfu": flops / secs / peak}


# ----------------------------------------------------------------------------------------------- main
def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct-f32"),
                    help="Hugging Face folder of SmolLM2-135M-Instruct in f32 (scripts/gguf_to_hf.py)")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median reported)")
    ap.add_argument("--repeats-largest-batch", type=int, default=1,
                    help="timed runs for the largest sampling batch (default 1: it is slow)")
    ap.add_argument("--score-micro-batch", type=int, default=16,
                    help="sequences per forward when scoring (default: all 16 in one)")
    ap.add_argument("--only", default=",".join(MEASURES), help="comma-separated subset of " + ",".join(MEASURES))
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    only = set(args.only.split(","))
    if only - set(MEASURES):
        ap.error(f"--only: unknown {sorted(only - set(MEASURES))}")
    if args.quick:
        sizes = dict(mm=1024, batches=[1, 4], prompt=32, new=16, score=(4, 64), train=(4, 64, 2))
        args.repeats, args.repeats_largest_batch = 1, 1
        args.score_micro_batch = min(args.score_micro_batch, 4)
    else:
        sizes = dict(mm=2048, batches=[1, 8, 32], prompt=150, new=128, score=(16, 300), train=(16, 300, 4))

    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no GPU")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    result = {
        "meta": {"torch": torch.__version__, "dtype": args.dtype, "threads": torch.get_num_threads(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu": cpu_name(), "quick": args.quick,
                 "repeats": args.repeats, "seed": args.seed, "model_dir": os.path.abspath(args.model_dir),
                 "device": str(DEVICE),
                 "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None},
    }
    import warnings
    import transformers
    import peft
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    result["meta"].update(transformers=transformers.__version__, peft=peft.__version__)

    if "matmul" in only or only & {"sample", "score", "train"}:
        # The peak is needed for every mfu; measure it even when only other measures were asked for.
        result["matmul"] = bench_matmul(sizes["mm"], args.repeats)
    peak = result["matmul"][f"{args.dtype}_gflops"] * 1e9
    result["meta"]["mfu_peak_gflops"] = peak / 1e9

    if only & {"sample", "score"}:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32).to(DEVICE).eval()
        shape = Shape(model)
        result["meta"].update(non_embedding_params=shape.n_nonemb, layers=shape.layers, hidden=shape.hidden,
                              vocab=shape.vocab)
        if "sample" in only:
            result["sample"] = bench_sample(model, shape, gen, sizes["batches"], sizes["prompt"], sizes["new"],
                                            args.repeats, args.repeats_largest_batch, peak)
        if "score" in only:
            n, length = sizes["score"]
            result["score"] = bench_score(model, shape, gen, n, length, args.score_micro_batch, args.repeats, peak)
        del model
        gc.collect()
    if "train" in only:
        n, length, n_micro = sizes["train"]
        result["train"] = bench_train(args.model_dir, gen, n, length, n_micro, args.dtype, args.repeats, peak)

    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    if DEVICE.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(DEVICE) / 1e9

    if args.json:
        print(json.dumps(result, indent=1))
        return
    m = result.get("matmul", {})
    print(f"PyTorch {torch.__version__}, {args.dtype}, {result['meta']['threads']} threads, "
          f"OMP_WAIT_POLICY={result['meta']['omp_wait_policy']}{' (QUICK sizes)' if args.quick else ''}")
    if m:
        print(f"matmul {m['n']}^3: f32 {m['f32_gflops']:.0f} GFLOP/s, bf16 {m['bf16_gflops']:.0f} GFLOP/s")
    for k, v in result.get("sample", {}).items():
        if k.startswith("batch_"):
            print(f"sample {k}: {v['new_tok_per_s']:.1f} new tok/s ({v['seconds']:.2f} s, mfu {v['mfu']:.1%})")
    if "score" in result:
        s = result["score"]
        print(f"score {s['sequences']}x{s['length']}: {s['tok_per_s']:.0f} tok/s ({s['seconds']:.2f} s, "
              f"mfu {s['mfu']:.1%})")
    if "train" in result:
        t = result["train"]
        print(f"train step {t['sequences']}x{t['length']} / {t['micro_batches']} micro-batches: "
              f"{t['seconds_per_step']:.2f} s (mfu {t['mfu']:.1%})")
    print(f"peak RSS {result['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
