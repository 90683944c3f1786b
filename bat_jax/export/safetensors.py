"""Safetensors files, written and read with NumPy only (bat_jax never imports torch).

The format: an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` (and ``__metadata__``, strings to
strings), padded with spaces to a multiple of 8, then the raw little-endian
tensor bytes back to back.
"""

import json
import struct
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from bat_jax import fs

# NumPy dtype name <-> safetensors dtype name.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16",
                       "bfloat16": "BF16", "int64": "I64", "int32": "I32",
                       "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_NUMPY_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _little_endian(array: np.ndarray) -> np.ndarray:
  array = np.asarray(array, order="C")  # (ascontiguousarray would make scalars 1-d)
  big = array.dtype.byteorder == ">" or (array.dtype.byteorder == "="
                                         and sys.byteorder == "big")
  return array.astype(array.dtype.newbyteorder("<")) if big else array


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes ``{name: array}`` (and string ``metadata``) as a safetensors file.

  Tensors are stored in the given order, back to back; the JSON header is
  padded with spaces to a multiple of 8 bytes so that the data is aligned.
  The file appears atomically (``fs.write_bytes``), at any path.
  """
  header: Dict[str, Any] = {}
  if metadata:
    bad = {k: v for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
      raise ValueError(f"safetensors metadata maps strings to strings; got {bad}.")
    header["__metadata__"] = dict(metadata)
  arrays, offset = [], 0
  for name, value in tensors.items():
    array = _little_endian(np.asarray(value))
    if array.dtype.name not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{name}: dtype {array.dtype} has no safetensors name.")
    header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name],
                    "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  fs.write_bytes(path, b"".join([struct.pack("<Q", len(raw)), raw] + [
      array.reshape(-1).view(np.uint8).tobytes() for array in arrays]))


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """``({name: array}, metadata)`` of a safetensors file (for checks and tests)."""
  blob = fs.read_bytes(path)
  (size,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + size])
  data = blob[8 + size:]
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, spec in header.items():
    begin, end = spec["data_offsets"]
    dtype = _numpy_dtype(spec["dtype"]).newbyteorder("<")
    tensors[name] = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize,
                                  offset=begin).reshape(spec["shape"])
  return tensors, metadata


def _numpy_dtype(name: str) -> np.dtype:
  if name == "BF16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top  # ships with jax
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(_NUMPY_DTYPES[name])
