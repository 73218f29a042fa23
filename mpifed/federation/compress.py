"""Compression of the cross-facility hop: codecs that turn an fp32 segment into bytes and back, with error
feedback that carries what one round's rounding lost into the next.

Every codec is a fixed-size block code: n values are cut into blocks of B (the last one zero-padded),
and each block becomes `block_bytes` bytes, laid out block after block. So any run of whole blocks
encodes and decodes on its own: `encode` and `decode` stream through a segment in chunks of 128K values
(small enough for the scratch buffers to stay in cache), on a few threads, into preallocated buffers.
Every codec runs fused C kernels where they could be built (kernels.py: one pass per block);
otherwise torch's and numpy's kernels, several passes. Both paths release the GIL and give the same
bytes.

Sizes and error bounds, per value x of a block whose largest magnitude is M:
  none  4 bytes (fp32, exact)
  bf16  2 bytes;                  |error| <= |x| * 2^-8 (round to nearest even)
  int8  1 + 4/256 = 1.016 bytes;  B = 256, levels k·M/127 for k in -127..127;  |error| <= M / 254
  int4  1/2 + 4/128 = 0.531 bytes; B = 128, levels k·M/7 for k in -7..7;      |error| <= M / 14
  int2  1/4 + 4/128 = 0.281 bytes; B = 128, levels ±M/3 and ±M;                |error| <= M / 3
  topk  per block of 64, the k = ceil(topk_fraction · 64) values of largest magnitude, each as a bf16
        value and a 1-byte index: 3k bytes (rounded up to a multiple of 4) per 64 values, so 0.19
        bytes per value at the default fraction 1/32 (k = 2); a kept value's |error| <= |x| * 2^-8,
        a dropped value's |error| = |x| <= the smallest kept magnitude of its block.
(int4 and int2 carry one fp32 scale per block; topk none.) With error feedback nothing is lost for
good: each root adds last round's residual before encoding and keeps what the code could not carry.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from mpifed.config import Compression, check_table
from mpifed.federation import kernels

CHUNK_VALUES = 1 << 17
"""Values per streamed chunk (rounded to whole blocks): its scratch buffers stay in a core's cache."""


RESIDUALS = ("residual", "sum_residual")
"""The error-feedback arrays a root keeps over its segment when a codec compresses the exchange (what
the exchange sends and what it sums; mpifed/federation/exchange.py): a checkpoint keeps them too."""

def _bf16_bits(x: np.ndarray, out: np.ndarray) -> None:
    """The bfloat16 bit patterns (uint16) of fp32 `x`, rounded to nearest even, into `out`."""
    torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).copy_(torch.from_numpy(x))


def _bf16_values(bits: np.ndarray) -> torch.Tensor:
    """fp32 values of bfloat16 bit patterns (uint16)."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()


def _t(array: np.ndarray) -> torch.Tensor:
    """The same memory as a tensor (the kernels are torch's: vectorised, and they release the GIL)."""
    return torch.from_numpy(array)


class Codec:
    """A fixed-size block code (see the module docstring). Subclasses implement `_encode` and `_decode`
    on a 2-D view of whole blocks."""

    name = ""
    block = 1
    """Values per block."""
    block_bytes = 4
    """Payload bytes per block."""

    def payload_bytes(self, n: int) -> int:
        return -(-n // self.block) * self.block_bytes

    fused = False
    """Whether this codec has C kernels (`_encode_fused`, `_decode_fused`); they run where they load."""

    def encode_blocks(self, x: np.ndarray, residual: np.ndarray | None, lost: np.ndarray | None,
                      out: np.ndarray, scratch: "_Scratch") -> None:
        """Encode whole blocks x (+ residual), flat fp32, into `out` (m x block_bytes); x + residual minus
        what the payload carries goes into `lost` (which may be `residual`; None: dropped)."""
        lib = kernels.library() if self.fused else None
        if lib is not None and all(a is None or a.flags.c_contiguous for a in (x, residual, lost, out)):
            self._encode_fused(lib, x, residual, lost, out)
            return
        m = len(out)
        t = scratch.f32(10, (m, self.block))
        if residual is None:
            np.copyto(t, x.reshape(m, -1))
        else:
            torch.add(_t(x), _t(residual), out=_t(t.reshape(-1)))
        self._encode(t, out, scratch.f32(12, t.shape) if lost is None else lost.reshape(m, -1), scratch)

    def decode_blocks(self, payload: np.ndarray, out: np.ndarray, add: bool, scratch: "_Scratch") -> None:
        """Decode whole blocks `payload` (m x block_bytes) into `out` (m x block fp32), or add them to it."""
        lib = kernels.library() if self.fused else None
        if lib is not None and payload.flags.c_contiguous and out.flags.c_contiguous:
            self._decode_fused(lib, payload, out, add)
        else:
            self._decode(payload, out, add, scratch)

    def _encode_fused(self, lib, x, residual, lost, out) -> None:
        raise NotImplementedError

    def _decode_fused(self, lib, payload, out, add) -> None:
        raise NotImplementedError

    def _encode(self, t: np.ndarray, out: np.ndarray, lost: np.ndarray, scratch: "_Scratch") -> None:
        """Encode blocks `t` (m x block fp32) into `out` (m x block_bytes uint8); write t - decode(out)
        into `lost` (m x block)."""
        raise NotImplementedError

    def _decode(self, payload: np.ndarray, out: np.ndarray, add: bool, scratch: "_Scratch") -> None:
        """Decode blocks `payload` into `out` (m x block fp32), or add them to it."""
        raise NotImplementedError


def _put(out: np.ndarray, values: torch.Tensor, add: bool) -> None:
    """out = values, or out += values."""
    target = _t(out)
    target.add_(values) if add else target.copy_(values)


class BF16(Codec):
    """bfloat16: the top 16 bits of each fp32 value, rounded to nearest even."""

    name, block, block_bytes, fused = "bf16", 1, 2, True

    def _encode_fused(self, lib, x, residual, lost, out):
        lib.mpifed_encode_bf16(kernels.f32(x), kernels.f32(residual), kernels.f32(lost), kernels.u8(out), len(out))

    def _decode_fused(self, lib, payload, out, add):
        lib.mpifed_decode_bf16(kernels.u8(payload), kernels.f32(out), len(payload), int(add))

    def _encode(self, t, out, lost, scratch):
        bits = out.view(np.uint16)
        _bf16_bits(t, bits)
        torch.sub(_t(t), _bf16_values(bits), out=_t(lost))

    def _decode(self, payload, out, add, scratch):
        _put(out, _bf16_values(payload.view(np.uint16)), add)


class _Uniform(Codec):
    """Symmetric levels per block (integers times the block's fp32 scale, stored in its first 4 bytes),
    each kept as a code of `bits` bits, 8 // bits codes to a byte (the first in the lowest bits).
    Subclasses say how a value becomes its code and what it loses (`_quantize`), and what a code's
    level is (`table`)."""

    bits = 8
    scale_of_max = 1.0
    """The block's scale is its largest magnitude times this."""
    fused = True

    def __init__(self) -> None:
        self.per_byte = 8 // self.bits
        self.block_bytes = 4 + self.block // self.per_byte
        codes = np.arange(256)[:, None] >> (self.bits * np.arange(self.per_byte)) & ((1 << self.bits) - 1)
        self.table = np.ascontiguousarray(self._level_of_code(codes), np.float32)
        """(256, per_byte): the levels of the codes packed in each possible byte, in order."""

    def _level_of_code(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _encode_fused(self, lib, x, residual, lost, out):
        lib.mpifed_encode_uniform(kernels.f32(x), kernels.f32(residual), kernels.f32(lost), kernels.u8(out),
                                  len(out), self.block, self.bits, self.scale_of_max)

    def _decode_fused(self, lib, payload, out, add):
        lib.mpifed_decode_uniform(kernels.u8(payload), kernels.f32(out), len(payload), self.block, self.bits,
                                  int(add))

    def _quantize(self, t: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor, q: torch.Tensor,
                  lost: torch.Tensor) -> torch.Tensor:
        """Each value's code (fp32, into `q`) and t minus its level times the scale (into `lost`)."""
        raise NotImplementedError

    def _encode(self, t, out, lost, scratch):
        scale_out, codes_out = out[:, :4].view(np.float32), out[:, 4:]
        t_, q = _t(t), _t(scratch.f32(0, t.shape))
        torch.abs(t_, out=q)
        top = q.amax(dim=1, keepdim=True).numpy()
        scale = np.multiply(top, np.float32(self.scale_of_max), out=top)
        # a subnormal scale's inverse overflows to inf (and inf * 0 is NaN): such a block carries nothing,
        # and error feedback keeps its values for a later round (as kernels.c does)
        scale[scale < np.finfo(np.float32).tiny] = 0
        scale_out[...] = scale
        inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
        codes = self._quantize(t_, _t(scale), _t(inverse), q, _t(lost))
        self._store(codes, codes_out, scratch)

    def _store(self, codes: torch.Tensor, out: np.ndarray, scratch: "_Scratch") -> None:
        """Codes (fp32 whole numbers, m x block) packed into `out`: as uint8 bytes read as little-endian
        words, each byte's code shifted down next to the previous one's, the rest masked off."""
        small = scratch.u8(0, tuple(codes.shape))
        _t(small).copy_(codes)
        word = np.uint16 if self.per_byte == 2 else np.uint32
        v = small.view(word)
        packed, shifted = scratch.u32(2, v.shape), scratch.u32(3, v.shape)
        np.copyto(packed, v)
        for j in range(1, self.per_byte):
            np.right_shift(v, j * (8 - self.bits), out=shifted, casting="unsafe")
            np.bitwise_or(packed, shifted, out=packed)
        np.bitwise_and(packed, 0xFF, out=packed)
        np.copyto(out, packed, casting="unsafe")

    def _decode(self, payload, out, add, scratch):
        scale = _t(np.ascontiguousarray(payload[:, :4]).view(np.float32))
        m = len(payload)
        levels = scratch.f32(1, (m, self.block // self.per_byte, self.per_byte))
        np.take(self.table, payload[:, 4:], axis=0, out=levels)
        values = _t(levels.reshape(m, self.block))
        # a product, then a sum: no fused multiply-add, whose rounding some CPUs would not share
        _put(out, values.mul_(scale), add) if add else torch.mul(values, scale, out=_t(out))


class Int8(_Uniform):
    """Levels -127..127 times max|x| / 127 of the block; the code is the level as a signed byte."""

    name, block, bits, scale_of_max = "int8", 256, 8, 1 / 127

    def _level_of_code(self, codes):
        return np.where(codes > 127, codes - 256, codes)

    def _quantize(self, t, scale, inverse, q, lost):
        torch.mul(t, inverse, out=q).round_()  # half to even
        torch.addcmul(t, q, scale, value=-1, out=lost)
        return q

    def _store(self, codes, out, scratch):
        _t(out.view(np.int8)).copy_(codes)  # exact: whole numbers in -127..127

    def _decode(self, payload, out, add, scratch):  # the code is the level: no table
        scale = _t(np.ascontiguousarray(payload[:, :4]).view(np.float32))
        codes = _t(payload[:, 4:].view(np.int8))
        values = _t(scratch.f32(1, out.shape))
        torch.mul(codes, scale, out=values)
        _put(out, values, add)


class Int4(_Uniform):
    """Levels -7..7 times max|x| / 7 of the block; code = level + 8."""

    name, block, bits, scale_of_max = "int4", 128, 4, 1 / 7

    def _level_of_code(self, codes):
        return codes - 8

    def _quantize(self, t, scale, inverse, q, lost):
        torch.mul(t, inverse, out=q).round_()
        torch.addcmul(t, q, scale, value=-1, out=lost)
        return q.add_(8)


class Int2(_Uniform):
    """Levels -3, -1, 1, 3 times max|x| / 3 of the block (so -M, -M/3, M/3, M); code = (level + 3) / 2."""

    name, block, bits, scale_of_max = "int2", 128, 2, 1 / 3

    def _level_of_code(self, codes):
        return 2 * codes - 3

    def _quantize(self, t, scale, inverse, q, lost):
        # the nearest of the four levels 2c - 3, c = 0..3: c = round((x / scale + 3) / 2)
        torch.mul(t, inverse.mul(0.5), out=q).add_(1.5).round_().clamp_(0, 3)
        torch.addcmul(t, q, scale.mul(2), value=-1, out=lost).add_(scale.mul(3))  # t - (2c - 3)·scale
        return q


class TopK(Codec):
    """The k values of largest magnitude of each block of 64: k bf16 values, then k 1-byte indices."""

    name, block, fused = "topk", 64, True

    def __init__(self, fraction: float = 1 / 32) -> None:
        self.fraction = fraction
        self.k = max(1, math.ceil(fraction * self.block - 1e-9))
        self.block_bytes = -(-3 * self.k // 4) * 4

    def _split(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return out[:, :2 * self.k].view(np.uint16), out[:, 2 * self.k:3 * self.k]

    def _largest(self, t: np.ndarray, scratch: "_Scratch") -> np.ndarray:
        """(m, k) indices of the k largest magnitudes of each row, largest first (ties: the first)."""
        m = len(t)
        magnitude = scratch.f32(0, t.shape)
        np.abs(t, out=magnitude)
        if self.k > 4:  # the same order as the passes below, and the C kernel's
            return np.argsort(np.negative(magnitude, out=magnitude), axis=1, kind="stable")[:, :self.k]
        rows, index = np.arange(m), np.empty((m, self.k), np.intp)
        for j in range(self.k):  # k passes of argmax beat a sort for small k
            index[:, j] = magnitude.argmax(axis=1)
            magnitude[rows, index[:, j]] = -1
        return index

    def _encode(self, t, out, lost, scratch):
        values_out, index_out = self._split(out)
        index = self._largest(t, scratch)
        rows = np.arange(len(t))[:, None]
        kept = np.ascontiguousarray(t[rows, index])
        bits = np.empty(kept.shape, np.uint16)
        _bf16_bits(kept, bits)
        values_out[...] = bits
        np.copyto(index_out, index, casting="unsafe")
        out[:, 3 * self.k:] = 0  # the padding: the same bytes on every run
        np.copyto(lost, t)
        lost[rows, index] = kept - _bf16_values(bits).numpy()

    def _encode_fused(self, lib, x, residual, lost, out):
        lib.mpifed_encode_topk(kernels.f32(x), kernels.f32(residual), kernels.f32(lost), kernels.u8(out), len(out),
                               self.k, self.block_bytes)

    def _decode_fused(self, lib, payload, out, add):
        lib.mpifed_decode_topk(kernels.u8(payload), kernels.f32(out), len(payload), self.k, self.block_bytes,
                               int(add))

    def _decode(self, payload, out, add, scratch):
        values, index = self._split(payload)
        rows = np.arange(len(payload))[:, None]
        if not add:
            out[...] = 0
        out[rows, index] += _bf16_values(np.ascontiguousarray(values)).numpy()  # distinct within a block


def make_codec(name: Compression, topk_fraction: float = 1 / 32) -> Codec | None:
    """The codec of federation.compress (None: fp32 as it is)."""
    return CODECS[name](topk_fraction) if name == "topk" else CODECS[name]() if CODECS[name] else None


CODECS: dict[str, type[Codec] | None] = {"none": None, "bf16": BF16, "int8": Int8, "int4": Int4, "int2": Int2,
                                        "topk": TopK}
"""federation.compress -> its codec class (None: fp32 as it is)."""
check_table(CODECS, Compression, "mpifed.federation.compress.CODECS")


# ------------------------------------------------------------------------------------------ streaming
class _Scratch(threading.local):
    """Each thread's reusable buffers, grown on demand and never shrunk."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], np.ndarray] = {}

    def _get(self, kind: str, slot: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        size = math.prod(shape)
        have = self.buffers.get((kind, slot))
        if have is None or len(have) < size:
            have = self.buffers[(kind, slot)] = np.empty(size, dtype)
        return have[:size].reshape(shape)

    def f32(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._get("f32", slot, shape, np.float32)

    def u8(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._get("u8", slot, shape, np.uint8)

    def u32(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._get("u32", slot, shape, np.uint32)


_scratch = _Scratch()
_pools: dict[int, ThreadPoolExecutor] = {}


def _one_torch_thread() -> None:
    """A codec worker runs each torch kernel on itself alone: the workers are the parallelism (torch's
    OpenMP thread count is per calling thread, so training's own count is untouched)."""
    torch.set_num_threads(1)


def _each_chunk(codec: Codec, n: int, work: Callable[[int, int], None], threads: int) -> None:
    """work(first_block, last_block) over the blocks of n values, in chunks, on `threads` threads."""
    blocks = -(-n // codec.block)
    per = max(1, CHUNK_VALUES // codec.block)
    spans = [(b, min(blocks, b + per)) for b in range(0, blocks, per)]
    if threads <= 1 or len(spans) < 2:
        for span in spans:
            work(*span)
        return
    pool = _pools.get(threads) or _pools.setdefault(threads, ThreadPoolExecutor(threads, "mpifed-codec",
                                                                                initializer=_one_torch_thread))
    for future in [pool.submit(work, *span) for span in spans]:
        future.result()


def encode(codec: Codec, x: np.ndarray, residual: np.ndarray | None = None, out: np.ndarray | None = None,
           threads: int = 1) -> np.ndarray:
    """The payload of fp32 `x`. With `residual` (error feedback, updated in place) it encodes
    x + residual and leaves in `residual` what the payload could not carry."""
    n = len(x)
    out = np.empty(codec.payload_bytes(n), np.uint8) if out is None else out
    rows = out.reshape(-1, codec.block_bytes)

    def work(first: int, last: int) -> None:
        m = last - first
        lo, hi = first * codec.block, min(n, last * codec.block)
        if hi - lo == m * codec.block:  # whole blocks: in place, the residual takes what is lost
            kept = None if residual is None else residual[lo:hi]
            codec.encode_blocks(x[lo:hi], kept, kept, rows[first:last], _scratch)
            return
        t = _scratch.f32(11, (m * codec.block,))  # the last, partial block: zero-padded
        t[hi - lo:] = 0
        t[:hi - lo] = x[lo:hi] if residual is None else x[lo:hi] + residual[lo:hi]
        lost = _scratch.f32(13, t.shape)
        codec.encode_blocks(t, None, lost, rows[first:last], _scratch)
        if residual is not None:
            residual[lo:hi] = lost[:hi - lo]

    _each_chunk(codec, n, work, threads)
    return out


def decode(codec: Codec, payload: np.ndarray, n: int, out: np.ndarray | None = None, add: bool = False,
           threads: int = 1) -> np.ndarray:
    """The n fp32 values of `payload`, into `out` (or added to it)."""
    out = np.zeros(n, np.float32) if out is None else out
    rows = payload.reshape(-1, codec.block_bytes)

    def work(first: int, last: int) -> None:
        lo, hi = first * codec.block, min(n, last * codec.block)
        if hi - lo == (last - first) * codec.block:
            codec.decode_blocks(rows[first:last], out[lo:hi].reshape(-1, codec.block), add, _scratch)
            return
        whole = _scratch.f32(14, (last - first, codec.block))
        codec.decode_blocks(rows[first:last], whole, False, _scratch)
        _put(out[lo:hi], _t(whole.reshape(-1)[:hi - lo]), add)

    _each_chunk(codec, n, work, threads)
    return out

