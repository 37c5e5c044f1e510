/* quantize.c: export.py's number crunching, in C (as llama.cpp's llama-quantize is beside its
 * converter). export.py writes the model file's header, tokenizer and tensor table itself, then
 * sends each weight matrix that needs converting here, and this writes its encoding into the
 * file at its offset:
 *
 *     quantize OUT.bin < frames
 *     frame: a text line "NAME SRC DST ROWS COLS OFFSET NBYTES\n", then NBYTES of SRC data
 *
 * SRC is the checkpoint's type: f32, f16, bf16 (little-endian), or q8_0 as GGUF stores it (per
 * row, blocks of an f16 scale and 32 int8 codes). DST is the model file's: f32, f16, bf16 or q8_0
 * in model.h's panel layout. The encodings are export.py's own (encode(), q8_panels()), bit for
 * bit: round to nearest even everywhere; q8_0's scale is f16(max|x| / 127) computed in double and
 * its codes round(x / scale) as Python computes them. A value f16 cannot hold, or a q8_0 group
 * that is not finite, is an error: "quantize: NAME: ..." on stderr, exit 1. Memory: one matrix in
 * and one out at a time. Built by make (./quantize); C11 and libm only. */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"

enum { Q8_BLOCK = 2 + MM_Q8_GROUP };  /* a GGUF Q8_0 block: an f16 scale, then 32 codes */

static const char *tensor = "";

static _Noreturn void fail(const char *fmt, const char *detail) {
    fprintf(stderr, "quantize: %s: ", tensor);
    fprintf(stderr, fmt, detail);
    fputc('\n', stderr);
    exit(1);
}

/* ---------------------------------------------------------------------------------------------
 * Half and bfloat16, as Python's struct "e" format and export.py's bf16 rounding make them */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | mant << 13;
    else if (exp) bits = sign | (exp + 112) << 23 | mant << 13;
    else if (!mant) bits = sign;
    else {  /* subnormal: mant x 2^-24 */
        float f = (float)mant * 0x1p-24f;
        return h & 0x8000 ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* a double to f16, rounding to nearest even once (CPython's PyFloat_Pack2): infinities stay,
 * NaN becomes the quiet NaN 0x7E00, and a finite value that rounds past 65504 sets *overflow */
static uint16_t f64_to_f16(double x, bool *overflow) {
    uint64_t bits;
    memcpy(&bits, &x, 8);
    uint16_t sign = (uint16_t)(bits >> 48 & 0x8000);
    double a = fabs(x);
    if (isnan(x)) return sign | 0x7E00;
    if (isinf(x)) return sign | 0x7C00;
    if (a < 0x1p-14) {  /* a subnormal half: a whole number of 2^-24, rounded */
        double units = a * 0x1p24, whole = floor(units), rest = units - whole;  /* (exact) */
        uint16_t h = (uint16_t)whole;
        if (rest > 0.5 || (rest == 0.5 && (h & 1))) h++;
        return sign | h;  /* (1024 is the smallest normal's encoding, as it should be) */
    }
    int e;
    double m = frexp(a, &e);           /* a = m 2^e, m in [0.5, 1) */
    double scaled = m * 2048.0;        /* 11 significant bits: [1024, 2048) */
    double whole = floor(scaled), rest = scaled - whole;
    uint32_t sig = (uint32_t)whole;
    if (rest > 0.5 || (rest == 0.5 && (sig & 1))) sig++;
    if (sig == 2048) sig = 1024, e++;
    int exp = e + 14;                  /* the half's biased exponent */
    if (exp >= 31) { *overflow = true; return sign | 0x7C00; }
    return (uint16_t)(sign | exp << 10 | (sig - 1024));
}

static uint16_t f32_to_bf16(float f) {  /* export.py: round to nearest even; inf and NaN truncated */
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7F800000) == 0x7F800000) return (uint16_t)(b >> 16);
    return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }

/* ---------------------------------------------------------------------------------------------
 * Source rows to float, float rows to the model file's encodings */

static void to_floats(const char *src, const uint8_t *in, size_t n, float *out) {
    if (!strcmp(src, "f32")) memcpy(out, in, n * 4);
    else if (!strcmp(src, "f16")) for (size_t i = 0; i < n; i++) out[i] = f16_to_f32(get_u16(in + 2 * i));
    else if (!strcmp(src, "bf16"))
        for (size_t i = 0; i < n; i++) {
            uint32_t b = (uint32_t)get_u16(in + 2 * i) << 16;
            memcpy(&out[i], &b, 4);
        }
    else  /* GGUF q8_0 blocks: code x scale, exact in float */
        for (size_t g = 0; g < n / MM_Q8_GROUP; g++) {
            const uint8_t *block = in + g * Q8_BLOCK;
            float d = f16_to_f32(get_u16(block));
            for (int i = 0; i < MM_Q8_GROUP; i++) out[g * MM_Q8_GROUP + i] = (float)(int8_t)block[2 + i] * d;
        }
}

/* model.h's q8_0 panels: 16 rows at a time, codes [cols/4][16][4] then f16 scales [groups][16];
 * rows past the matrix's end are zeros. codes [rows][cols], scales [rows][groups] as f16 bits. */
static void write_panels(const int8_t *codes, const uint16_t *scales, size_t rows, size_t cols, uint8_t *out) {
    size_t groups = cols / MM_Q8_GROUP, panel = MM_Q8_PANEL * cols + 2 * groups * MM_Q8_PANEL;
    for (size_t p0 = 0; p0 < rows; p0 += MM_Q8_PANEL) {
        uint8_t *c = out + p0 / MM_Q8_PANEL * panel, *s = c + MM_Q8_PANEL * cols;
        memset(c, 0, panel);
        for (size_t i = 0; i < MM_Q8_PANEL && p0 + i < rows; i++) {
            const int8_t *row = codes + (p0 + i) * cols;
            for (size_t k = 0; k < cols; k++) c[k / 4 * 4 * MM_Q8_PANEL + 4 * i + k % 4] = (uint8_t)row[k];
            for (size_t g = 0; g < groups; g++) put_u16(s + 2 * (g * MM_Q8_PANEL + i), scales[(p0 + i) * groups + g]);
        }
    }
}

/* export.py's encode(..., "q8_0"): per group of 32, scale = f16(amax / 127.0) in double, codes
 * floor(x / scale + 0.5) in double, clamped to +-127 */
static void quantize_q8(const float *x, size_t rows, size_t cols, int8_t *codes, uint16_t *scales) {
    for (size_t g = 0; g < rows * cols / MM_Q8_GROUP; g++) {
        const float *v = x + g * MM_Q8_GROUP;
        float amax = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++) {
            if (!isfinite(v[i])) fail("a weight is not finite; cannot quantise to q8_0", "");
            amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
        }
        bool overflow = false;
        uint16_t h = f64_to_f16((double)amax / 127.0, &overflow);
        if (overflow) {
            char magnitude[32];
            snprintf(magnitude, sizeof magnitude, "%g", (double)amax);
            fail("a weight of magnitude %s exceeds what q8_0's f16 scales hold; export as f32", magnitude);
        }
        scales[g] = h;
        double d = (double)f16_to_f32(h), inv = d != 0 ? 1.0 / d : 0.0;
        for (int i = 0; i < MM_Q8_GROUP; i++) {
            double product = (double)v[i] * inv;  /* (two roundings, as Python's: never one fused) */
            double q = floor(product + 0.5);
            codes[g * MM_Q8_GROUP + i] = (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
        }
    }
}

static size_t out_bytes(const char *dst, size_t rows, size_t cols) {
    if (!strcmp(dst, "f32")) return rows * cols * 4;
    if (!strcmp(dst, "f16") || !strcmp(dst, "bf16")) return rows * cols * 2;
    return (rows + MM_Q8_PANEL - 1) / MM_Q8_PANEL * (MM_Q8_PANEL * cols + 2 * cols / MM_Q8_GROUP * MM_Q8_PANEL);
}

static size_t in_bytes(const char *src, size_t rows, size_t cols) {
    if (!strcmp(src, "f32")) return rows * cols * 4;
    if (!strcmp(src, "f16") || !strcmp(src, "bf16")) return rows * cols * 2;
    return rows * cols / MM_Q8_GROUP * Q8_BLOCK;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) fail("out of memory (%s)", "one matrix");
    return p;
}

static void convert(const char *src, const char *dst, const uint8_t *in, size_t rows, size_t cols, uint8_t *out) {
    size_t n = rows * cols;
    if (!strcmp(src, "q8_0") && !strcmp(dst, "q8_0")) {  /* GGUF blocks to panels, codes and scales as they are */
        size_t groups = cols / MM_Q8_GROUP;
        int8_t *codes = xmalloc(n);
        uint16_t *scales = xmalloc(2 * rows * groups);
        for (size_t g = 0; g < rows * groups; g++) {
            scales[g] = get_u16(in + g * Q8_BLOCK);
            memcpy(codes + g * MM_Q8_GROUP, in + g * Q8_BLOCK + 2, MM_Q8_GROUP);
        }
        write_panels(codes, scales, rows, cols, out);
        free(codes), free(scales);
        return;
    }
    float *x = xmalloc(4 * n);
    to_floats(src, in, n, x);
    if (!strcmp(dst, "f32")) memcpy(out, x, 4 * n);
    else if (!strcmp(dst, "bf16")) for (size_t i = 0; i < n; i++) put_u16(out + 2 * i, f32_to_bf16(x[i]));
    else if (!strcmp(dst, "f16")) {
        bool overflow = false;
        for (size_t i = 0; i < n; i++) put_u16(out + 2 * i, f64_to_f16(x[i], &overflow));
        if (overflow) fail("a value exceeds the f16 range (65504); export as bf16 or f32", "");
    } else {
        int8_t *codes = xmalloc(n);
        uint16_t *scales = xmalloc(2 * (n / MM_Q8_GROUP));
        quantize_q8(x, rows, cols, codes, scales);
        write_panels(codes, scales, rows, cols, out);
        free(codes), free(scales);
    }
    free(x);
}

static bool one_of(const char *s, const char *a, const char *b, const char *c, const char *d) {
    return !strcmp(s, a) || !strcmp(s, b) || !strcmp(s, c) || !strcmp(s, d);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fputs("usage: quantize OUT.bin < frames  (export.py runs it; see quantize.c)\n", stderr);
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) fail("cannot open %s for writing", argv[1]);
    char line[256], name[MM_NAME_LEN + 1], src[8], dst[8];
    unsigned long long rows, cols, offset, nbytes;
    while (fgets(line, sizeof line, stdin)) {
        tensor = "(frame)";
        if (sscanf(line, "%64s %7s %7s %llu %llu %llu %llu", name, src, dst, &rows, &cols, &offset, &nbytes) != 7)
            fail("a frame line that does not read as NAME SRC DST ROWS COLS OFFSET NBYTES: %s", line);
        tensor = name;
        if (!one_of(src, "f32", "f16", "bf16", "q8_0") || !one_of(dst, "f32", "f16", "bf16", "q8_0"))
            fail("types f32, f16, bf16 or q8_0 expected: %s", line);
        if (!rows || !cols || rows > 1u << 24 || cols > 1u << 24 ||
            ((!strcmp(src, "q8_0") || !strcmp(dst, "q8_0")) && cols % MM_Q8_GROUP))
            fail("a shape it cannot convert: %s", line);
        if (nbytes != in_bytes(src, rows, cols)) fail("the data's size does not fit its shape and type: %s", line);
        uint8_t *in = xmalloc(nbytes), *out = xmalloc(out_bytes(dst, rows, cols));
        if (fread(in, 1, nbytes, stdin) != nbytes) fail("the data ends early%s", "");
        convert(src, dst, in, rows, cols, out);
        size_t size = out_bytes(dst, rows, cols), done = 0;
        while (done < size) {
            ssize_t put = pwrite(fd, out + done, size - done, (off_t)(offset + done));
            if (put <= 0) fail("write failed (%s)", strerror(errno));
            done += (size_t)put;
        }
        free(in), free(out);
    }
    if (close(fd) != 0) fail("write failed (%s)", strerror(errno));
    return 0;
}
