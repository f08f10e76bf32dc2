"""The markdown table of bench/gpu.sh's results.jsonl: per case, each side's median tokens/s over
the steps after the warm-up, peak CUDA memory, `ftune memory`'s prediction (ftune rows), MFU
against the measured bf16 GEMM rate (full fine-tuning), and ftune / peer ratios against the
issue's targets (LoRA and QLoRA: 1.5x the peer's tokens/s at no more memory; full: MFU >= 50%).
Usage: gpu_report.py RESULTS_JSONL WARM"""
import datetime
import json
import statistics as st
import sys

TITLES = {
    "lora_1b": "LoRA r16 all linears, TinyLlama-1.1B shape, bf16, seq 2048 packed, "
               "no checkpointing",
    "lora_1b_ckpt": "the same with gradient checkpointing",
    "full_1b": "full fine-tuning, TinyLlama-1.1B shape, bf16 autocast over fp32 master weights",
    "qlora_7b": "QLoRA r16 all linears, Llama-2-7B shape (NF4), compute bf16, checkpointing",
    "qlora_70b": "QLoRA r16 all linears, Llama-2-70B shape (NF4) on one GPU, checkpointing",
}
PEERS = {"lora_1b": "peft", "lora_1b_ckpt": "peft", "full_1b": "torch_loop", "qlora_7b": "peft_bnb"}


def gb(x):
    return f"{x / 1e9:.2f}" if x else "-"


def main():
    recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    warm = int(sys.argv[2])
    gemm = [r for r in recs if r["case"] == "gemm" and "flops_per_s" in r]
    peak = gemm[-1]["flops_per_s"] if gemm else 0
    print(f"# GPU benchmarks, {datetime.date.today()}"
          + (f": {gemm[-1]['device']}, torch {gemm[-1]['torch']}, bf16 GEMM {peak / 1e12:.0f}"
             " TFLOP/s (8192^3, the MFU denominator)" if gemm else ""))
    fpt = {r["case"]: r["flops_per_token"] for r in recs if "flops_per_token" in r}
    for case, title in TITLES.items():
        rows = [r for r in recs if r["case"] == case and r["impl"] != "_done"]
        if not rows:
            continue
        print(f"\n## {case}: {title}\n")
        print("| side | tokens/s (median, steps > warm-up) | peak CUDA memory GB | predicted GB"
              " (ftune memory) | MFU | final loss |")
        print("|---|---|---|---|---|---|")
        tok, mem = {}, {}
        for r in rows:
            impl = r["impl"]
            if "error" in r:
                print(f"| {impl} | failed: {r['error'][:150]} | |"
                      f" {gb(r.get('predicted_bytes'))} | | |")
                continue
            if "step_s" not in r:  # a prediction only
                print(f"| {impl} | | | {gb(r.get('predicted_bytes'))} | | |")
                continue
            steps = [n / d for n, d in zip(r["step_tokens"][warm:], r["step_s"][warm:])]
            tok[impl] = st.median(steps) if steps else 0
            mem[impl] = r.get("peak_mem_bytes") or r.get("peak_mem_bytes_rank0") or 0
            mfu = (f"{tok[impl] * fpt[case] / peak:.1%}" if case in fpt and peak else
                   (f"{r['mfu_logged']:.1%}" if "mfu_logged" in r and case == "full_1b" else ""))
            loss = r.get("final_loss")
            loss = f"{loss:.4f}" if loss is not None else ""
            print(f"| {impl} | {tok[impl]:.0f} | {gb(mem[impl])} | {gb(r.get('predicted_bytes'))} |"
                  f" {mfu} | {loss} |")
        peer = PEERS.get(case)
        if "ftune" in tok and peer in tok and tok[peer] and mem.get(peer):
            t, m = tok["ftune"] / tok[peer], mem["ftune"] / mem[peer]
            verdict = "meets" if t >= 1.5 and m <= 1.0 else "misses"
            if case == "full_1b":
                verdict = ""
            print(f"\nftune / {peer}: tokens/s {t:.2f}x, peak memory {m:.2f}x"
                  + (f" ({verdict} the 1.5x-at-no-more-memory target)" if verdict else ""))
        if case == "full_1b" and "ftune" in tok and case in fpt and peak:
            mfu = tok["ftune"] * fpt[case] / peak
            print(f"\nftune MFU {mfu:.1%} ({'meets' if mfu >= 0.5 else 'misses'} the 50% target)")


if __name__ == "__main__":
    sys.exit(main())
