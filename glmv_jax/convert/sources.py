"""Where load_pretrained reads HF tensors from: boxes of safetensors files, or of in-memory arrays.

    with FileSource(found, quantised, block) as src:
        block = src.read(key, ((0, 64), (128, 256)), np.float32)   # only those rows and columns
        src.bytes_read                                             # stored bytes read so far

`read(key, box, dtype)` returns the HF tensor's box cast to `dtype`; block-wise fp8 tensors (fp8.py) come
dequantised with the scales of the blocks the box touches. Safetensors data is read through
safe_open(...).get_slice (only the box's bytes leave the file); fp8 data, which safetensors' numpy backend
cannot build, through a memory map of the raw tensor. `nbytes(key, box)` is what such a read costs, from
the headers alone (the bytes-read plan).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError, safe_open

from glmv_jax.convert import fp8
from glmv_jax.convert.mapping import ConversionError
from glmv_jax.convert.views import Box, box_shape, slices


def open_safetensors(file: Path):
    """safe_open with errors that name the file."""
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _scale_box(box: Box, block: tuple[int, int]) -> Box:
    """The scale blocks that a box of an fp8 tensor touches (leading dims as they are)."""
    (r0, r1), (c0, c1) = box[-2:]
    return (*box[:-2], (r0 // block[0], -(-r1 // block[0])), (c0 // block[1], -(-c1 // block[1])))


class FileSource:
    """Boxes of the tensors in safetensors files. found: key -> (file, shape, stored dtype) from the headers;
    quantised: fp8 key -> its scale key; block: the fp8 block size (None without fp8)."""

    def __init__(self, found: Mapping[str, tuple[Path, tuple, np.dtype]], quantised: Mapping[str, str] | None = None,
                 block: tuple[int, int] | None = None):
        self.found, self.quantised, self.block = found, dict(quantised or {}), block
        self.handles: dict[Path, object] = {}
        self.spans: dict[Path, dict] = {}
        self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()

    def nbytes(self, key: str, box: Box) -> int:
        """Stored bytes a read of `box` takes (the fp8 scales it needs included)."""
        _, _, dtype = self.found[key]
        count = math.prod(box_shape(box)) * dtype.itemsize
        if key in self.quantised:
            count += math.prod(box_shape(_scale_box(box, self.block))) * self.found[self.quantised[key]][2].itemsize
        return count

    def _handle(self, file: Path):
        if file not in self.handles:
            self.handles[file] = open_safetensors(file).__enter__()
        return self.handles[file]

    def _raw(self, key: str, box: Box) -> np.ndarray:
        file, shape, dtype = self.found[key]
        try:
            if dtype == fp8.FP8:
                if file not in self.spans:
                    self.spans[file] = fp8.fp8_spans(file)
                offset, size = self.spans[file][key]
                if size != math.prod(shape) or Path(file).stat().st_size < offset + size:
                    raise ConversionError(f"{file}: tensor {key} is truncated or mis-sized (shape {shape})")
                data = np.memmap(file, np.uint8, "r", offset, (size,)).view(fp8.FP8).reshape(shape)
                block = np.array(data[slices(box)])
            else:
                block = self._handle(file).get_slice(key)[slices(box)]
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{file}: cannot read tensor {key} ({e})") from e
        self.bytes_read += block.nbytes
        return block

    def read(self, key: str, box: Box, dtype) -> np.ndarray:
        """The box of tensor `key`, in `dtype` (fp8 dequantised)."""
        block = self._raw(key, box)
        if key not in self.quantised:
            return block.astype(dtype, copy=False)
        scales = self._raw(self.quantised[key], _scale_box(box, self.block))
        origin = (box[-2][0] % self.block[0], box[-1][0] % self.block[1])
        return fp8.dequantize_fp8_blockwise(block, scales, self.block, dtype, origin)


class MemorySource:
    """Boxes of in-memory arrays (an HF state_dict as numpy)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays, self.bytes_read = arrays, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def nbytes(self, key: str, box: Box) -> int:
        return math.prod(box_shape(box)) * self.arrays[key].dtype.itemsize

    def read(self, key: str, box: Box, dtype) -> np.ndarray:
        block = self.arrays[key][slices(box)]
        self.bytes_read += block.nbytes
        return block.astype(dtype, copy=False)
