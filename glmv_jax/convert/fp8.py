"""Block-wise FP8 weights: the format of the released GLM-4.5V-FP8 / GLM-4.6V-FP8 checkpoints.

A quantised weight `<name>.weight` (..., M, N) is stored as float8_e4m3fn (safetensors "F8_E4M3") next to
`<name>.weight_scale_inv` (..., ceil(M/bm), ceil(N/bn)) float32, one scale per bm x bn block, with the block
size in config.json's `quantization_config.weight_block_size` ([128, 128] in the released checkpoints).
The weight is each fp8 value times the scale of its block. Unquantised tensors (norms, embeddings, router,
vision tower) are stored as usual and carry no scale. load_pretrained (hf.py) plans the scales from the
headers and dequantises box by box as it reads (sources.py); quantize_fp8_blockwise writes the format.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from glmv_jax.convert.mapping import ConversionError, listing

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)     # 448, the largest finite e4m3 value
ST_NAME = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"                                         # "<name>.weight" -> "<name>.weight_scale_inv"


def block_size(hf_config: Mapping) -> tuple[int, int] | None:
    """(bm, bn) from config.json's quantization_config; None when it declares no quantisation."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConversionError(f"quantization_config {q.get('quant_method')!r} / fmt {q.get('fmt')!r} is not "
                              "supported (only block-wise fp8 e4m3)")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConversionError(f"quantization_config.weight_block_size {block!r} must be two positive ints "
                              "(per-tensor fp8 scales are not supported)")
    return tuple(block)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """(..., M, N) -> (..., ceil(M/bm), ceil(N/bn))."""
    *lead, m, n = shape
    return (*lead, -(-m // block[0]), -(-n // block[1]))


def plan_scales(shapes: Mapping[str, tuple], dtypes: Mapping[str, np.dtype],
                block: tuple[int, int] | None) -> dict[str, str]:
    """Quantised key -> its scale key, after checking that every fp8 tensor has a scale of the right shape.
    Scales of unquantised tensors are left to the key check (they are unexpected keys)."""
    quantised = [k for k, d in dtypes.items() if d == FP8]
    if quantised and block is None:
        raise ConversionError(f"{len(quantised)} float8 tensors ({listing(quantised, 3)}) but config.json has no "
                              "quantization_config with a weight_block_size")
    problems = []
    for key in quantised:
        scale, shape = key + SCALE_SUFFIX, tuple(shapes[key])
        if len(shape) < 2:
            problems.append(f"{key}: float8 tensor of shape {shape} (block scales need a matrix)")
        elif scale not in shapes:
            problems.append(f"{key}: float8 tensor without its scale {scale}")
        elif tuple(shapes[scale]) != scale_shape(shape, block):
            problems.append(f"{scale}: expected shape {scale_shape(shape, block)} ({block[0]}x{block[1]} blocks of "
                            f"{key} {shape}), found {tuple(shapes[scale])}")
    if problems:
        raise ConversionError(f"{len(problems)} fp8 weights with a missing or mis-shaped scale: {listing(problems)}")
    return {k: k + SCALE_SUFFIX for k in quantised}


def quantize_fp8_blockwise(array, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(..., M, N) float -> (float8_e4m3fn (..., M, N), scale_inv float32 (..., ceil(M/bm), ceil(N/bn))).

    Each block's largest |x| maps to 448, so array ~= fp8 * scale_inv within e4m3 rounding: at most
    2^-4 |x| (3 mantissa bits), or 2^-10 * scale_inv in the subnormal range. All-zero blocks get scale 1."""
    x = np.asarray(array, np.float32)
    if x.ndim < 2:
        raise ValueError(f"block-wise fp8 needs an array of rank >= 2, got shape {x.shape}")
    (m, n), (bm, bn) = x.shape[-2:], block
    gm, gn = scale_shape(x.shape, block)[-2:]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, gm * bm - m), (0, gn * bn - n)])
    blocks = padded.reshape(*x.shape[:-2], gm, bm, gn, bn)
    amax = np.abs(blocks).max(axis=(-3, -1))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = np.clip(blocks / scale_inv[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(FP8)
    return np.ascontiguousarray(q.reshape(padded.shape)[..., :m, :n]), scale_inv


def dequantize_fp8_blockwise(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                             dtype=np.float32, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """fp8 (..., M, N) and the scales of the blocks it touches -> (..., M, N) in `dtype`: each value times its
    block's scale in float32, then cast. `origin`: where q starts inside its first block, (0, 0) for a whole
    tensor, (row0 % bm, col0 % bn) for a box of one. One row block at a time, so only the output is full size."""
    (m, n), (bm, bn), (oi, oj) = q.shape[-2:], block, origin
    out = np.empty(q.shape, dtype)
    for i in range(-oi, m, bm):
        lo, hi = max(i, 0), min(i + bm, m)
        scale = np.repeat(np.asarray(scale_inv[..., (i + oi) // bm, :], np.float32), bn, axis=-1)[..., None, oj:oj + n]
        out[..., lo:hi, :] = q[..., lo:hi, :].astype(np.float32) * scale
    return out


def fp8_spans(file: Path) -> dict[str, tuple[int, int]]:
    """key -> (file offset, byte count) of each F8_E4M3 tensor, from the raw safetensors header (safetensors'
    numpy backend cannot build float8 arrays)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                for k, v in header.items() if k != "__metadata__" and v["dtype"] == ST_NAME}
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConversionError(f"{file}: corrupt or truncated safetensors file ({e!r})") from e
