"""Minimal safetensors reader/writer (numpy only; Debian has no python3-safetensors).

Format: 8-byte little-endian u64 header length N, then N bytes of JSON header
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}
(offsets relative to the first byte after the header), then the raw little-endian data.
The header is padded with spaces so the data starts 8-byte aligned.
"""
import json
import os
import struct

import numpy as np

_DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NP = {np.dtype(v).str.lstrip("<>|="): k for k, v in _DT.items()}


def _code(arr):
    return _NP[arr.dtype.newbyteorder("<").str.lstrip("<>|=")]


def save_file(tensors, path, metadata=None):
    """tensors: dict name -> numpy array (any numeric dtype above). Atomic write."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        n = a.nbytes
        header[name] = {"dtype": _code(a), "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        arrays.append(a)
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def load_file(path):
    """Returns (dict name -> numpy array, metadata dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        dt = np.dtype(_DT[h["dtype"]]).newbyteorder("<")
        a = np.frombuffer(raw, dtype=dt, count=(e - b) // dt.itemsize, offset=base + b)
        out[name] = a.reshape(h["shape"]).copy()
        if int(np.prod(h["shape"])) * dt.itemsize != e - b:
            raise ValueError(f"{name}: shape {h['shape']} does not match {e - b} bytes")
    return out, meta
