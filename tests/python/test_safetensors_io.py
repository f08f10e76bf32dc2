"""ftune's safetensors I/O against the Python reference (safetensors 0.7, transformers).

Drives tests/io/safetensors_tool (path in FTUNE_SAFETENSORS_TOOL, set by CTest):
(a) files written by safetensors.torch.save_file are read byte-identically by ftune;
(b) files and sharded model dirs written by ftune load identically in safetensors / transformers;
(c) malformed files make the tool exit 1 with one error line naming the file.
"""
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TOOL = os.environ.get("FTUNE_SAFETENSORS_TOOL")


def tool(*args, check=True):
    assert TOOL, "FTUNE_SAFETENSORS_TOOL is not set (run through ctest)"
    r = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    t = {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "f32": torch.randn(4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (5,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15 - 1, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (1, 6), generator=g, dtype=torch.uint8),
        "bool": torch.randint(0, 2, (5,), generator=g).bool(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).bfloat16(),
    }
    return t


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_reads_files_written_by_python(tmp_path):
    tensors = sample_tensors()
    meta = {"format": "pt", "creator": "python"}
    f = tmp_path / "py.safetensors"
    save_file(tensors, str(f), metadata=meta)
    tool("dump", f, tmp_path / "dump")
    listing = json.loads((tmp_path / "dump" / "listing.json").read_text())
    assert listing["metadata"] == meta
    # Names in offset order, as the file lays them out.
    with safe_open(str(f), "pt") as so:
        assert set(listing["names"]) == set(so.keys())
    header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
    header = json.loads(f.read_bytes()[8:8 + header_len])
    by_offset = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    assert listing["names"] == [k for _, k in by_offset]
    for i, entry in enumerate(listing["tensors"]):
        ref = tensors[entry["name"]]
        assert entry["dtype"] == DTYPE_NAMES[ref.dtype]
        assert entry["shape"] == list(ref.shape)
        assert (tmp_path / "dump" / f"{i}.bin").read_bytes() == raw_bytes(ref), entry["name"]


def test_python_reads_files_written_by_ftune(tmp_path):
    tensors = sample_tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    out = tmp_path / "ours.safetensors"
    tool("copy", src, out)
    data = out.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0 and (8 + n) % 8 == 0
    loaded = load_file(str(out))
    assert loaded.keys() == tensors.keys()
    for k, ref in tensors.items():
        assert loaded[k].dtype == ref.dtype, k
        assert loaded[k].shape == ref.shape, k
        assert torch.equal(loaded[k], ref), k
    with safe_open(str(out), "pt") as so:
        assert so.metadata() == {"format": "pt"}


def tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_sharded_layout_round_trip_with_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    model = tiny_llama(tmp_path)
    single = tmp_path / "single"
    model.save_pretrained(single, safe_serialization=True)
    assert (single / "model.safetensors").exists()

    # ftune loads transformers' single file and writes small shards; transformers loads those.
    sharded = tmp_path / "sharded"
    tool("reshard", single, sharded, 2000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert not (sharded / "model.safetensors").exists()
    # transformers-style index reading: every weight_map entry is in the shard it names.
    for name, f in index["weight_map"].items():
        with safe_open(str(sharded / f), "pt") as so:
            assert name in so.keys()
            assert torch.equal(so.get_tensor(name), sd[name]), name
    (sharded / "config.json").write_text((single / "config.json").read_text())
    assert_same_model(model, LlamaForCausalLM.from_pretrained(sharded, torch_dtype=torch.bfloat16))

    # transformers' own shards -> ftune single file -> transformers.
    hf_sharded = tmp_path / "hf_sharded"
    model.save_pretrained(hf_sharded, safe_serialization=True, max_shard_size="3KB")
    assert (hf_sharded / "model.safetensors.index.json").exists()
    back = tmp_path / "back"
    tool("reshard", hf_sharded, back, 1 << 30)
    assert (back / "model.safetensors").exists()
    assert not (back / "model.safetensors.index.json").exists()
    (back / "config.json").write_text((single / "config.json").read_text())
    assert_same_model(model, LlamaForCausalLM.from_pretrained(back, torch_dtype=torch.bfloat16))


def write_raw(path, header, data=b"", length=None):
    h = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


F32x2 = '"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
MALFORMED = {
    "too_short": (b"abc", None, None),
    "length_beyond_file": ("{}", b"", 10_000),
    "bad_json": ('{"t":', b"", None),
    "not_object": ("[1]", b"", None),
    "entry_not_object": ('{"t":[1,2]}', b"", None),
    "unknown_dtype": ('{"t":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}}', b"xx", None),
    "size_mismatch": ('{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"x" * 8, None),
    "out_of_range": ("{" + F32x2 + "}", b"x" * 4, None),
    "overlap": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"x" * 12, None),
    "uncovered": ("{" + F32x2 + "}", b"x" * 16, None),
    "duplicate": ("{" + F32x2 + "," + F32x2 + "}", b"x" * 8, None),
    "metadata_not_strings": ('{"__metadata__":{"a":1}}', b"", None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_one_line_errors(tmp_path, case):
    header, data, length = MALFORMED[case]
    f = tmp_path / f"{case}.safetensors"
    if data is None:
        f.write_bytes(header)
    else:
        write_raw(f, header, data, length)
    # The reference library rejects these too, so the cases are real format violations; it lets
    # duplicate names through (the last one wins), which REFERENCE.md §1 says a reader must reject.
    if case == "duplicate":
        assert list(load_file(str(f)).keys()) == ["t"]
    else:
        with pytest.raises(Exception):
            load_file(str(f))
    r = tool("dump", f, tmp_path / "out", check=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {f}: "), lines[0]


def test_missing_model_dir_is_one_line_error(tmp_path):
    r = tool("reshard", tmp_path / "nope", tmp_path / "out", 100, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {tmp_path / 'nope'}: no model.safetensors or model.safetensors.index.json"


def test_header_limit_is_100_mb_like_the_reference(tmp_path):
    # A header of exactly 100,000,000 bytes (an empty object padded with spaces) is accepted by
    # both readers; 8 bytes more is refused by both, ftune naming the limit.
    limit = 100_000_000
    ok = write_raw(tmp_path / "ok.safetensors", "{}" + " " * (limit - 2))
    assert load_file(str(ok)) == {}
    assert tool("dump", ok, tmp_path / "out_ok").returncode == 0
    big = write_raw(tmp_path / "big.safetensors", "{}" + " " * (limit + 6))
    with pytest.raises(Exception, match="header too large"):
        load_file(str(big))
    r = tool("dump", big, tmp_path / "out_big", check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {big}: header: length {limit + 8} exceeds the 100 MB limit"
