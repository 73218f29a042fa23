"""Compression of the cross-facility hop: codecs that turn an fp32 segment into bytes and back, and the
error-feedback wrapper that carries what one round's rounding lost into the next.

Payload sizes for n values:
  none  4n bytes (fp32, exact)
  bf16  2n bytes; relative error per value <= 2^-8 (round to nearest even)
  int8  n + 4*ceil(n/256) bytes (0.254x fp32); per value |error| <= max|x in its block of 256| / 254
"""
from __future__ import annotations

import numpy as np

from mpifed.config import Compression, check_table

INT8_BLOCK = 256


class BF16:
    """bfloat16: the top 16 bits of each fp32 value, rounded to nearest even; 2 bytes per value."""

    name = "bf16"

    @staticmethod
    def payload_bytes(n: int) -> int:
        return 2 * n

    @staticmethod
    def encode(x: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))  # round to nearest even
        return (rounded >> 16).astype(np.uint16).view(np.uint8)

    @staticmethod
    def decode(payload: np.ndarray, n: int) -> np.ndarray:
        return (payload.view(np.uint16).astype(np.uint32) << 16).view(np.float32)[:n]


class Int8:
    """Symmetric int8 with one fp32 scale per block of 256 values (scale = max|x| / 127)."""

    name = "int8"

    @staticmethod
    def payload_bytes(n: int) -> int:
        blocks = -(-n // INT8_BLOCK)
        return 4 * blocks + n

    @staticmethod
    def encode(x: np.ndarray) -> np.ndarray:
        n = len(x)
        blocks = -(-n // INT8_BLOCK)
        padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
        padded[:n] = x
        padded = padded.reshape(blocks, INT8_BLOCK)
        scales = np.abs(padded).max(axis=1) / np.float32(127)
        safe = np.where(scales > 0, scales, np.float32(1))
        values = np.rint(padded / safe[:, None]).astype(np.int8).reshape(-1)[:n]
        return np.concatenate([scales.astype(np.float32).view(np.uint8), values.view(np.uint8)])

    @staticmethod
    def decode(payload: np.ndarray, n: int) -> np.ndarray:
        blocks = -(-n // INT8_BLOCK)
        scales = payload[:4 * blocks].view(np.float32)
        values = payload[4 * blocks:4 * blocks + n].view(np.int8).astype(np.float32)
        return values * np.repeat(scales, INT8_BLOCK)[:n]


CODECS: dict[str, type | None] = {"none": None, "bf16": BF16, "int8": Int8}
"""federation.compress -> its codec (None: fp32 as it is)."""
check_table(CODECS, Compression, "mpifed.federation.compress.CODECS")


class ErrorFeedback:
    """Compress x + residual and keep what was lost as the next residual, so that over many rounds the
    sum of what was sent equals the sum of what should have been sent, up to one round's error."""

    def __init__(self, codec: type, n: int) -> None:
        self.codec = codec
        self.residual = np.zeros(n, dtype=np.float32)

    def compress(self, x: np.ndarray) -> np.ndarray:
        target = x + self.residual
        payload = self.codec.encode(target)
        np.subtract(target, self.codec.decode(payload, len(x)), out=self.residual)
        return payload
