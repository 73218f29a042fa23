/* Fused block kernels of the cross-facility codecs (see compress.py for the formats and bounds).

   Each call works on m whole blocks and makes one pass over each: error feedback, the block's scale,
   quantisation, the residual and packing in encode; unpacking, scaling and the sum in decode. They
   compute exactly what compress.py's torch path computes, operation for operation in fp32 (built with
   -ffp-contract=off, no fast-math), so payloads and decoded sums are the same bytes whichever path a
   root takes. The residual is one fused multiply-add, as torch's vectorised addcmul computes it on
   CPUs with FMA (elsewhere the two paths' residuals may differ in the last bit). Rounding to the nearest integer, half to even, adds and subtracts 1.5 * 2^23: exact for
   the |q| <= 128 that occur here, and it vectorises on any x86-64 or Arm CPU.

   Pointers: x is what to encode; residual, when not NULL, is added to x first; lost, when not NULL,
   receives x (+ residual) minus what the payload carries (it may be residual itself). */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */

static inline float round_even(float q) {
    return (q + ROUND_MAGIC) - ROUND_MAGIC; /* not folded: without fast-math the compiler keeps IEEE */
}

/* |v| as an integer that orders as |v| does (NaN above infinity): the sign bit cleared. Maxima of these
   vectorise without fast-math, where float maxima do not. */
static inline int32_t magnitude_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (int32_t)(u & 0x7fffffffu);
}

/* The block's values (x + residual) into t, and its largest magnitude (NaN if it holds a NaN, as
   torch's amax gives). */
static inline float load_block(const float *x, const float *residual, float *t, int64_t n) {
    int32_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = residual ? x[i] + residual[i] : x[i];
        int32_t a = magnitude_bits(v);
        t[i] = v;
        top = a > top ? a : top;
    }
    if (top > 0x7f800000) return NAN;
    float largest;
    memcpy(&largest, &top, 4);
    return largest;
}

/* A code as a byte; a NaN (only in a block whose scale is NaN, which decodes to NaN) as 0. */
static inline float finite_code(float c) { return c == c ? c : 0.0f; }

/* int8 (bits 8), int4 (bits 4) and int2 (bits 2) encode: per block a fp32 scale, then the codes,
   8 / bits to a byte, the first in the lowest bits. */
void mpifed_encode_uniform(const float *x, float *residual, float *lost, uint8_t *out, int64_t m,
                           int64_t block, int bits, float scale_of_max) {
    float t[256], q[256];
    const int64_t row = 4 + block * bits / 8;
    for (int64_t b = 0; b < m; b++) {
        const float *xb = x + b * block;
        float *rb = residual ? residual + b * block : 0;
        float *lb = lost ? lost + b * block : 0;
        uint8_t *ob = out + b * row;
        float scale = load_block(xb, rb, t, block) * scale_of_max;
        /* A subnormal scale's inverse overflows to infinity, and infinity times a zero is NaN: such a
           block carries nothing (scale 0) and error feedback keeps its values for a later round. */
        if (scale < FLT_MIN) scale = 0.0f; /* a NaN scale stays NaN */
        float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
        memcpy(ob, &scale, 4);
        if (bits == 2) { /* levels 2c - 3: c = clamp(round(t / (2 scale) + 1.5), 0, 3) */
            float half = inverse * 0.5f, twice = scale * 2.0f, thrice = scale * 3.0f;
            for (int64_t i = 0; i < block; i++) {
                float c = round_even(t[i] * half + 1.5f);
                c = c < 0.0f ? 0.0f : (c > 3.0f ? 3.0f : c);
                if (lb) lb[i] = fmaf(-c, twice, t[i]) + thrice;
                q[i] = finite_code(c);
            }
        } else {
            float offset = bits == 4 ? 8.0f : 0.0f;
            for (int64_t i = 0; i < block; i++) {
                float c = round_even(t[i] * inverse);
                if (lb) lb[i] = fmaf(-c, scale, t[i]);
                q[i] = finite_code(c) + offset;
            }
        }
        uint8_t *codes = ob + 4;
        if (bits == 8) {
            for (int64_t i = 0; i < block; i++) codes[i] = (uint8_t)(int8_t)q[i];
        } else if (bits == 4) {
            for (int64_t i = 0; i < block / 2; i++)
                codes[i] = (uint8_t)((uint32_t)q[2 * i] | ((uint32_t)q[2 * i + 1] << 4));
        } else {
            for (int64_t i = 0; i < block / 4; i++)
                codes[i] = (uint8_t)((uint32_t)q[4 * i] | ((uint32_t)q[4 * i + 1] << 2) |
                                     ((uint32_t)q[4 * i + 2] << 4) | ((uint32_t)q[4 * i + 3] << 6));
        }
    }
}

/* Decode into out (m * block values), or add into it. */
void mpifed_decode_uniform(const uint8_t *payload, float *out, int64_t m, int64_t block, int bits,
                           int add) {
    const int64_t row = 4 + block * bits / 8;
    float level[256];
    for (int64_t b = 0; b < m; b++) {
        const uint8_t *pb = payload + b * row, *codes = pb + 4;
        float *ob = out + b * block;
        float scale;
        memcpy(&scale, pb, 4);
        if (bits == 8) {
            for (int64_t i = 0; i < block; i++) level[i] = (float)(int8_t)codes[i];
        } else if (bits == 4) {
            for (int64_t i = 0; i < block / 2; i++) {
                level[2 * i] = (float)(int)(codes[i] & 15) - 8.0f;
                level[2 * i + 1] = (float)(int)(codes[i] >> 4) - 8.0f;
            }
        } else {
            for (int64_t i = 0; i < block / 4; i++)
                for (int j = 0; j < 4; j++) level[4 * i + j] = 2.0f * (float)(int)((codes[i] >> (2 * j)) & 3) - 3.0f;
        }
        if (add) {
            for (int64_t i = 0; i < block; i++) ob[i] = ob[i] + level[i] * scale;
        } else {
            for (int64_t i = 0; i < block; i++) ob[i] = level[i] * scale;
        }
    }
}

/* bfloat16 bits of v, rounded to nearest even (NaN: the quiet NaN torch gives). */
static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_value(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* topk encode, blocks of 64: the k values of largest magnitude (ties: the first), in descending
   order of magnitude, as k bf16 values then k 1-byte indices, zero padding to row_bytes. */
void mpifed_encode_topk(const float *x, float *residual, float *lost, uint8_t *out, int64_t m, int k,
                        int64_t row_bytes) {
    float t[64];
    int32_t a[64];
    int index[64];
    for (int64_t b = 0; b < m; b++) {
        const float *xb = x + b * 64;
        float *rb = residual ? residual + b * 64 : 0;
        float *lb = lost ? lost + b * 64 : 0;
        uint8_t *ob = out + b * row_bytes;
        load_block(xb, rb, t, 64);
        for (int i = 0; i < 64; i++) a[i] = magnitude_bits(t[i]);
        for (int j = 0; j < k; j++) { /* per kept value (k is 2 at the default): the largest, then */
            int32_t top = a[0];        /* the first place it is at (taken ones are -1, below all) */
            for (int i = 1; i < 64; i++) top = a[i] > top ? a[i] : top;
            int best = 0;
            while (best < 63 && a[best] != top) best++;
            index[j] = best;
            a[best] = -1;
        }
        memset(ob, 0, (size_t)row_bytes);
        if (lb) memcpy(lb, t, sizeof t);
        for (int j = 0; j < k; j++) {
            uint16_t bits = bf16_bits(t[index[j]]);
            memcpy(ob + 2 * j, &bits, 2);
            ob[2 * k + j] = (uint8_t)index[j];
            if (lb) lb[index[j]] = t[index[j]] - bf16_value(bits);
        }
    }
}

void mpifed_decode_topk(const uint8_t *payload, float *out, int64_t m, int k, int64_t row_bytes, int add) {
    for (int64_t b = 0; b < m; b++) {
        const uint8_t *pb = payload + b * row_bytes;
        float *ob = out + b * 64;
        if (!add) memset(ob, 0, 64 * sizeof(float));
        for (int j = 0; j < k; j++) {
            uint16_t bits;
            memcpy(&bits, pb + 2 * j, 2);
            ob[pb[2 * k + j]] += bf16_value(bits);
        }
    }
}

/* bf16 encode: each value's bfloat16 bits, rounded to nearest even (2 bytes, little-endian; the
   payload may start at any byte, hence memcpy). */
void mpifed_encode_bf16(const float *x, float *residual, float *lost, uint8_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = residual ? x[i] + residual[i] : x[i];
        uint16_t bits = bf16_bits(v);
        memcpy(out + 2 * i, &bits, 2);
        if (lost) lost[i] = v - bf16_value(bits);
    }
}

void mpifed_decode_bf16(const uint8_t *payload, float *out, int64_t n, int add) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t bits;
        memcpy(&bits, payload + 2 * i, 2);
        out[i] = add ? out[i] + bf16_value(bits) : bf16_value(bits);
    }
}
