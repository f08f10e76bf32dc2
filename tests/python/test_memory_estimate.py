"""`ftune memory` against independent oracles: parameter counts of transformers' LlamaForCausalLM
built on the meta device from each preset's published config; the ZeRO paper's model-state
formulas (REFERENCE.md §5), computed here, for every strategy at 1, 2, 4 and 8 ranks, to the byte;
LoRA parameter counts from PEFT's get_peft_model; NF4 bytes from bitsandbytes' quantize_4bit;
activation bytes from the tensors torch's autograd saves for transformers' decoder layer; the
bad-input errors; and --fit recommending only what fits."""
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ftune_testing import ftune, write_json

# The published config.json values of each preset (Hugging Face hub), written out independently of
# ftune's table.
HF = {
    "TinyLlama-1.1B": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rope_theta=10000.0),
    "CodeLlama-7B": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=16384, rope_theta=1000000.0),
    "CodeLlama-13B": dict(vocab_size=32016, hidden_size=5120, intermediate_size=13824,
                          num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                          max_position_embeddings=16384, rope_theta=1000000.0),
    "CodeLlama-34B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                          num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8,
                          max_position_embeddings=16384, rope_theta=1000000.0),
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rope_theta=10000.0),
    "Llama-2-13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        max_position_embeddings=4096, rope_theta=10000.0),
    "Llama-2-70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=4096, rope_theta=10000.0),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "Llama-3-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192, rope_theta=500000.0),
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "SmolLM2-360M": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "SmolLM2-1.7B": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=8192, rope_theta=130000.0,
                         tie_word_embeddings=True),
}
for _c in HF.values():
    _c.setdefault("tie_word_embeddings", False)
    _c["rms_norm_eps"] = 1e-5

STRATEGY_STAGE = {"single": 0, "ddp": 0, "zero1": 1, "zero2": 2, "fsdp": 3, "pipeline": 0,
                  "model_parallel": 0}


def memory(*args):
    return json.loads(ftune("memory", *args, "--json").stdout)


def hf_model(cfg, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**cfg, **extra))


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.fixture(scope="module")
def counts():
    """Per preset: total, per-layer, embedding and head parameters from transformers."""
    out = {}
    for name, cfg in HF.items():
        m = hf_model(cfg)
        layer = sum(p.numel() for p in m.model.layers[0].parameters())
        emb = m.model.embed_tokens.weight.numel()
        head = 0 if cfg["tie_word_embeddings"] else m.lm_head.weight.numel()
        out[name] = dict(total=n_params(m), layer=layer, embedding=emb, head=head,
                         norm=m.model.norm.weight.numel(), layers=cfg["num_hidden_layers"])
    return out


def test_presets_match_transformers(counts):
    for name, cfg in HF.items():
        j = memory("--model", name)
        assert j["model"]["parameters"] == counts[name]["total"], name
        got = j["model"]["config"]
        for key, value in cfg.items():
            assert got[key] == value, f"{name}: {key}"


def zero_states(psi, n, stage, mixed=True):
    """REFERENCE.md §5 per rank: 2 Psi + 2 Psi + 12 Psi (fp32: 4 + 4 + 8, no master), stage 1
    dividing the optimizer terms by N, stage 2 the gradients too, stage 3 everything; a divided
    term holds ceil(Psi / N) elements (the flat space is padded to a multiple of N)."""
    shard = -(-psi // n)
    w, g, m, k = (2, 2, 4, 8) if mixed else (4, 4, 0, 8)
    return dict(weights=w * (shard if stage >= 3 else psi),
                gradients=g * (shard if stage >= 2 else psi),
                master_weights=m * (shard if stage >= 1 else psi),
                optimizer_states=k * (shard if stage >= 1 else psi))


def paper_total(psi, n, stage):
    """The paper's one-line totals: 16 Psi, 4 Psi + 12 Psi/N, 2 Psi + 14 Psi/N, 16 Psi/N."""
    shard = -(-psi // n)
    return [16 * psi, 4 * psi + 12 * shard, 2 * psi + 14 * shard, 16 * shard][stage]


def stage_layers(layers, stages):
    """Layers per stage for equal layers: blocks of at most ceil(L / P) filled from the last stage
    back, each leaving a layer for every stage before it (so the first stages, which also hold
    the embedding, take the fewer layers)."""
    cap, left, out = -(-layers // stages), layers, []
    for k in reversed(range(stages)):
        take = min(cap, left - k)
        out.append(take)
        left -= take
    return out[::-1]


def test_zero_model_states_to_the_byte(counts):
    runs = []  # (preset, strategy, ranks, dtype)
    for name in HF:
        for strategy in STRATEGY_STAGE:
            for n in (1, 2, 4, 8):
                if (strategy == "single" and n > 1) or (strategy == "model_parallel" and n == 1):
                    continue
                runs.append((name, strategy, n, "bf16"))
        if name in ("SmolLM2-135M", "Llama-2-7B", "Llama-3-70B"):
            runs += [(name, "zero2", 4, "fp32"), (name, "fsdp", 4, "fp32")]
    # ~300 runs of the binary: two at a time.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: memory("--model", r[0], "--strategy", r[1],
                                                 "--world-size", r[2], "--dtype", r[3]), runs))
    for (name, strategy, n, dtype), j in zip(runs, results):
        c, stage, where = counts[name], STRATEGY_STAGE[strategy], (name, strategy, n, dtype)
        psi, dp = c["total"], n
        if strategy in ("pipeline", "model_parallel") and n > 1:
            dp = 1
            blocks = stage_layers(c["layers"], n)
            k = j["stages"]["largest"]
            psi = blocks[k] * c["layer"] + (c["embedding"] if k == 0 else 0) + \
                (c["norm"] + c["head"] if k == n - 1 else 0)
            assert j["stages"]["split"] == [sum(blocks[:i]) for i in range(n + 1)], where
        assert j["trainable_on_rank"] == psi, where
        rank, want = j["per_rank"], zero_states(psi, dp, stage, mixed=dtype == "bf16")
        assert {k: rank[k] for k in want} == want, where
        if dtype == "bf16":
            assert rank["model_states"] == paper_total(psi, dp, stage), where
    assert len(runs) == len(HF) * (1 + 4 * 5 + 3) + 3 * 2


@pytest.mark.parametrize("r,targets", [(8, ["q_proj", "v_proj"]), (16, ["all-linear"]),
                                       (4, ["k_proj", "o_proj", "down_proj"])])
def test_lora_counts_match_peft(tmp_path, r, targets):
    from peft import LoraConfig, get_peft_model
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    write_json(tmp_path / "config.json", {**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    for model_ref, hf_cfg in ((str(tmp_path / "config.json"), cfg), ("Llama-2-7B", HF["Llama-2-7B"]),
                              ("SmolLM2-135M", HF["SmolLM2-135M"])):
        base = hf_model(hf_cfg)
        with torch.device("meta"):
            peft_model = get_peft_model(base, LoraConfig(r=r, target_modules=peft_targets))
        want = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        j = memory("--model", model_ref, "--lora-r", r, "--lora-targets", ",".join(targets))
        assert j["model"]["trainable"] == want, model_ref
        assert j["trainable_on_rank"] == want
        # The adapters are fp32 with their gradients and AdamW state: 4 + 4 + 8 bytes each.
        rank = j["per_rank"]
        assert (rank["weights"], rank["gradients"], rank["optimizer_states"]) == (4 * want, 4 * want, 8 * want)


def bnb_nf4_bytes(shape):
    """What bitsandbytes holds for one NF4 weight with double quantization: the packed data, the
    uint8 absmax, the nested fp32 absmax and 256-entry map, the 16-entry code, the fp32 offset."""
    import bitsandbytes.functional as F
    w = torch.randn(shape, dtype=torch.bfloat16)
    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return (q.numel() * q.element_size() + st.absmax.numel() * st.absmax.element_size() +
            st.code.numel() * st.code.element_size() + st.state2.absmax.numel() * 4 +
            st.state2.code.numel() * 4 + 4)


def test_nf4_bytes_match_bitsandbytes(tmp_path):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    write_json(tmp_path / "config.json", {**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    m = hf_model(cfg)
    layer = m.model.layers[0]
    linears = [mod for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    dense = n_params(m) - cfg["num_hidden_layers"] * sum(l.weight.numel() for l in linears)
    want = cfg["num_hidden_layers"] * sum(bnb_nf4_bytes(tuple(l.weight.shape)) for l in linears) + 2 * dense
    j = memory("--model", tmp_path / "config.json", "--qlora", "--lora-r", 4)
    assert j["per_rank"]["frozen_base"] == want
    # REFERENCE.md §3: 4 + 8/64 + 32/(64*256) = 4.127 bits/param, plus the per-weight tables.
    big = bnb_nf4_bytes((4096, 4096))
    assert abs(8 * big / 4096 ** 2 - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3
    j = memory("--model", "Llama-2-7B", "--qlora")
    dense7 = HF["Llama-2-7B"]["vocab_size"] * 4096 * 2 + 4096 * (2 * 32 + 1)
    bits = 8 * (j["per_rank"]["frozen_base"] - 2 * dense7) / (32 * (4 * 4096 ** 2 + 3 * 4096 * 11008))
    assert abs(bits - 4.127) < 2e-3


def saved_per_layer(cfg, bf16, wdtype, lora=None, batch=2, seq=40, dropout=0.0):
    """Bytes of the distinct storages autograd saves for one decoder layer of transformers'
    LlamaModel (SDPA), layer 2 of 2 minus layer 1 of 1; parameters and their autocast casts are
    not activations."""
    from transformers import LlamaConfig, LlamaModel

    def run(layers):
        torch.manual_seed(0)
        m = LlamaModel(LlamaConfig(**cfg, num_hidden_layers=layers, attn_implementation="sdpa"))
        m = m.to(wdtype)
        if lora:
            from peft import LoraConfig, get_peft_model
            m = get_peft_model(m, LoraConfig(r=lora[0], target_modules=lora[1],
                                             lora_dropout=dropout))
            m.train()
        shapes = {p.shape for p in m.parameters()} | {p.shape[::-1] for p in m.parameters()}
        ptrs = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if t.numel() and t.shape not in shapes and st.data_ptr() not in ptrs:
                seen[st.data_ptr()] = st.nbytes()
            return t
        x = torch.randn(batch, seq, cfg["hidden_size"], dtype=wdtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                m(inputs_embeds=x)
        return sum(seen.values())
    return run(2) - run(1)


@pytest.mark.parametrize("dtype,lora", [
    ("fp32", None), ("bf16", None), ("bf16", (8, "all-linear")), ("bf16", (8, ["q_proj", "v_proj"])),
    ("fp32", (4, ["q_proj", "v_proj", "down_proj"])), ("bf16", (16, ["o_proj", "gate_proj"]))])
def test_activations_match_autograd(tmp_path, dtype, lora):
    cfg = dict(vocab_size=50, hidden_size=96, intermediate_size=160, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    write_json(tmp_path / "config.json", {**cfg, "num_hidden_layers": 2, "model_type": "llama",
                                          "architectures": ["LlamaForCausalLM"]})
    bf16 = dtype == "bf16"
    # Full fine-tuning keeps fp32 weights under autocast; LoRA's frozen base is in the dtype.
    wdtype = torch.bfloat16 if (bf16 and lora) else torch.float32
    want = saved_per_layer(cfg, bf16, wdtype, lora)
    args = ["--model", tmp_path / "config.json", "--dtype", dtype, "--micro-batch", 2, "--seq-len", 40]
    if lora:
        targets = lora[1] if isinstance(lora[1], str) else ",".join(lora[1])
        args += ["--lora-r", lora[0], "--lora-targets", targets]
    assert memory(*args)["activations"]["per_layer"] == want


@pytest.mark.parametrize("dtype,lora", [
    ("fp32", (8, "all-linear")), ("bf16", (8, "all-linear")), ("bf16", (4, ["q_proj", "v_proj"])),
    ("fp32", (4, ["o_proj", "down_proj"]))])
def test_lora_dropout_matches_peft_saved(tmp_path, dtype, lora):
    """LoRA dropout on the CPU: PEFT's nn.Dropout on each adapter's (fp32) input saves its float
    noise, and lora_A then saves the dropped input (or its autocast cast) instead of a shared
    one."""
    cfg = dict(vocab_size=50, hidden_size=96, intermediate_size=160, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    write_json(tmp_path / "config.json", {**cfg, "num_hidden_layers": 2, "model_type": "llama",
                                          "architectures": ["LlamaForCausalLM"]})
    bf16 = dtype == "bf16"
    wdtype = torch.bfloat16 if bf16 else torch.float32
    want = saved_per_layer(cfg, bf16, wdtype, lora, dropout=0.1)
    targets = lora[1] if isinstance(lora[1], str) else ",".join(lora[1])
    args = ["--model", tmp_path / "config.json", "--dtype", dtype, "--micro-batch", 2,
            "--seq-len", 40, "--lora-r", lora[0], "--lora-targets", targets]
    got = memory(*args, "--lora-dropout", 0.1, "--device", "cpu")
    assert got["activations"]["per_layer"] == want
    assert got["options"]["lora_dropout"] == 0.1 and got["options"]["device"] == "cpu"
    # On CUDA the fused dropout keeps a bool mask: 3 bytes per element fewer than the CPU's noise.
    cuda = memory(*args, "--lora-dropout", 0.1)
    n_in = {"q_proj": 96, "k_proj": 96, "v_proj": 96, "o_proj": 96, "gate_proj": 96,
            "up_proj": 96, "down_proj": 160}
    names = list(n_in) if lora[1] == "all-linear" else lora[1]
    fewer = sum(3 * n_in[t] * 2 * 40 for t in names)
    assert got["activations"]["per_layer"] - cuda["activations"]["per_layer"] == fewer
    # Without dropout the adapters' inputs are what the existing oracle checks.
    assert memory(*args, "--device", "cpu")["activations"]["per_layer"] == \
        saved_per_layer(cfg, bf16, wdtype, lora)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_mask_matches_sdpa_saved(tmp_path, dtype):
    """Packed rows: what torch's SDPA saves for its backward beyond the causal call when given
    ftune's block-diagonal [B, 1, S, S] bool mask (a copy in the compute dtype), per layer."""
    B, S, hq, hkv, d = 2, 40, 4, 2, 24
    bf16 = dtype == "bf16"

    def saved(mask):
        q = torch.randn(B, hq, S, d, requires_grad=True)
        kv = [torch.randn(B, hkv, S, d, requires_grad=True) for _ in range(2)]
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.nn.functional.scaled_dot_product_attention(
                    q, *kv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return sum(seen.values())
    doc = torch.tensor([0] * 15 + [1] * 25)
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(S, S, dtype=torch.bool).tril())
    want = saved(mask.expand(B, 1, S, S).contiguous()) - saved(None)
    cfg = dict(vocab_size=50, hidden_size=hq * d, intermediate_size=160, num_attention_heads=hq,
               num_key_value_heads=hkv, max_position_embeddings=128, rms_norm_eps=1e-5)
    write_json(tmp_path / "config.json", {**cfg, "num_hidden_layers": 2, "model_type": "llama",
                                          "architectures": ["LlamaForCausalLM"]})
    args = ["--model", tmp_path / "config.json", "--dtype", dtype, "--micro-batch", B,
            "--seq-len", S]
    plain, packed = memory(*args), memory(*args, "--packing")
    assert packed["activations"]["per_layer"] - plain["activations"]["per_layer"] == want
    # The bool mask itself, once for the whole forward.
    assert (packed["per_rank"]["activations"] - plain["per_rank"]["activations"]
            == 2 * want + B * S * S)


def error_of(*args):
    p = ftune("memory", *args, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, (p.returncode, p.stderr)
    return lines[0]


def test_bad_input_is_one_line_naming_the_flag():
    assert error_of("--model", "Llama-9-1B").startswith('ftune: error: memory: --model: "Llama-9-1B" is neither a preset')
    assert error_of("--model", "Llama-2-7B", "--strategy", "pipeline", "--world-size", 6, "--pp", 4) == \
        "ftune: error: memory: --world-size: 6 is not divisible by --pp 4"
    assert error_of("--model", "Llama-2-7B", "--micro-batch", "-2") == \
        'ftune: error: memory: --micro-batch: expected an integer >= 1, got "-2"'
    assert error_of("--model", "Llama-2-7B", "--gpu-mem", "lots") == \
        'ftune: error: memory: --gpu-mem: expected a size such as 80GB, 24GiB or 81920MiB, got "lots"'
    assert error_of("--model", "Llama-2-7B", "--dtype", "fp16").startswith(
        "ftune: error: memory: --dtype: fp16 is not supported")
    assert error_of("--model", "Llama-2-7B", "--strategy", "zero4").startswith(
        "ftune: error: memory: --strategy: expected one of single, ddp")
    assert error_of("--model", "Llama-2-7B", "--strategy", "ddp", "--world-size", 2,
                    "--offload", "optimizer").startswith("ftune: error: memory: --offload:")
    assert error_of("--model", "Llama-2-7B", "--lora-r", 8, "--lora-targets", "qkv").startswith(
        "ftune: error: memory: --lora-targets: unknown module 'qkv'")
    assert error_of("--model", "Llama-2-7B", "--fit").startswith("ftune: error: memory: --fit: needs --gpu-mem")
    assert error_of("--model", "Llama-2-7B", "--fit", "--gpu-mem", "80GB", "--gpus", 2,
                    "--strategy", "single").startswith("ftune: error: memory: --strategy: single cannot run on --gpus 2")


def test_fit_recommends_only_what_fits():
    for model, gpu_mem, gpus in (("Llama-3-8B", "24GB", 2), ("Llama-3-8B", "80GB", 1),
                                 ("Llama-2-70B", "80GB", 8), ("SmolLM2-135M", "8GB", 1),
                                 ("CodeLlama-34B", "48GB", 4)):
        j = memory("--model", model, "--fit", "--gpu-mem", gpu_mem, "--gpus", gpus)
        limit = j["gpu_mem"]
        assert j["best"] is not None, model
        for cand in [j["best"], *j["top"]]:
            assert cand["total"] <= limit and cand["fits"]
        # The same setup estimated on its own gives the same total (the flags carry everything).
        o = j["best"]["options"]
        args = ["--model", model, "--strategy", o["strategy"], "--world-size", o["world_size"],
                "--dtype", o["dtype"], "--micro-batch", o["micro_batch"], "--seq-len", o["seq_len"],
                "--offload", o["offload"], "--gpu-mem", gpu_mem]
        if o["method"] != "full":
            args += ["--lora-r", o["lora_r"], "--lora-targets", ",".join(o["lora_targets"])]
        if o["qlora"]:
            args += ["--qlora"]
        if o["grad_ckpt"]:
            args += ["--grad-ckpt"]
        again = memory(*args)
        assert again["total"] == j["best"]["total"] and again["fits"]
        sets = j["best"]["train_overrides"]
        assert f"training.micro_batch={o['micro_batch']}" in sets


def test_fit_says_when_nothing_fits():
    p = ftune("memory", "--model", "Llama-2-70B", "--fit", "--gpu-mem", "8GB")
    assert "nothing fits" in p.stdout and "closest" in p.stdout
    j = memory("--model", "Llama-2-70B", "--fit", "--gpu-mem", "8GB")
    assert j["best"] is None and j["closest"]["total"] > j["gpu_mem"]
    assert j["closest"]["options"]["method"] == "qlora"


def test_table_reads():
    out = ftune("memory", "--model", "Llama-3-8B", "--strategy", "fsdp", "--world-size", 8,
                "--gpu-mem", "80GB").stdout
    assert "16 Psi/N" in out and "\nfits in 80.00 GB" in out
    assert math.isclose(memory("--model", "Llama-3-8B")["model"]["parameters"] / 1e9, 8.03, abs_tol=0.01)
