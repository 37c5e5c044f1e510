/* kernels/vector.h: the vector layer of the fast kernels, the one place that knows the
 * instruction set. The kernels (matmul.c, attention.c) are written once over these few operations:
 *
 *   vf   a vector of VL floats: load, store, add, multiply-add, sums and maxima across its lanes,
 *        and loads of f16 and bf16 weights converted to f32
 *   f4   a vector of 4 floats (a tile's four row sums)
 *   qi   a vector of int32 sums, or of 4 bytes of each of Q8_LANES weight rows (q8_0 tiles)
 *   qf   the f32 vector of those lanes
 *
 * It also holds the quantiser of the activations for q8_0 matrices (quantize_q8_fast).
 *
 * x86-64 gets AVX-512 (with VNNI's byte dot products where the compiler targets them) or AVX2 with
 * FMA and F16C (with AVX-VNNI where targeted); aarch64 gets NEON (with ARMv8.2's dot product
 * where targeted). Each block also sets the tile shapes its 16 or 32 registers allow:
 *   TILE_TOKENS     tokens of a dot-product tile (blocks of 2-15 tokens): TILE_ROWS x TILE_TOKENS sums
 *   OP_ROWS         weight rows of a prompt tile: OP_ROWS x 2 vectors of tokens
 *   SCORE_QUERIES   queries of an attention score tile: SCORE_QUERIES x KEY_BLOCK / VL sums
 *   PV_VECS         vectors of head_dim columns in attention's P.V tile: 4 rows x PV_VECS sums
 *   Q8_TILE_TOKENS  tokens of a q8_0 tile: 2 vectors of rows x Q8_TILE_TOKENS sums
 * The tiles' switches are written for the values used (asserted below).
 */
#ifndef KERNELS_VECTOR_H
#define KERNELS_VECTOR_H

#include "../kernels.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define TILE_ROWS 4              /* weight rows of a dot-product tile (vf_hsum4 sums four at once) */

#if KERNELS_BUILT  /* (a build without them includes nothing below) */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
typedef __m128 f4;
static ALWAYS_INLINE f4 f4_load(const float *p) { return _mm_loadu_ps(p); }
static ALWAYS_INLINE void f4_store(float *p, f4 v) { _mm_storeu_ps(p, v); }
static ALWAYS_INLINE f4 f4_add(f4 a, f4 b) { return _mm_add_ps(a, b); }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define KERNELS_NAME "avx512"
#define HAVE_AVX512 1
enum { VL = 16 };
#define TILE_TOKENS 6       /* 24 of the 32 registers accumulate */
#define OP_ROWS 12          /* 24 accumulators + 2 activation vectors + 1 broadcast of 32 registers */
#define SCORE_QUERIES 8     /* attention scores: 8 queries x 16 keys, 8 accumulators */
#define PV_VECS 6           /* 4 rows x 6 vectors: 24 accumulators, head_dim 96 in one pass over the values */
typedef __m512 vf;
static ALWAYS_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
static ALWAYS_INLINE vf vf_set1(float a) { return _mm512_set1_ps(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static ALWAYS_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static ALWAYS_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static ALWAYS_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    /* a b + c */
static ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  /* c - a b */
static ALWAYS_INLINE float vf_hsum(vf v) { return _mm512_reduce_add_ps(v); }
static ALWAYS_INLINE float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
static ALWAYS_INLINE f4 vf_hsum4(vf a, vf b, vf c, vf d) {  /* [sum a, sum b, sum c, sum d] */
    vf ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a b a b per 128 bits */
    vf cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    vf abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
static ALWAYS_INLINE vf vf_round(vf v) {
    return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static ALWAYS_INLINE vf vf_exp2i(vf k) {  /* 2^k for whole k in [-126, 127]: k + 127 in the exponent */
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
}
static ALWAYS_INLINE vf vf_load_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static ALWAYS_INLINE vf vf_load_bf16(const uint16_t *p) {  /* bf16 is the top half of an f32 */
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* Half vectors, vh: 8 floats in a 256-bit register, lanes 0-7 or 8-15 of a vf. Decoding's weight
 * rows can be read in them (matmul.c, dot_row_halves): lane for lane the same sums in the same
 * order as whole vectors, so the same bits, for processors that read memory faster so (AMD Zen
 * 4, which executes a 512-bit instruction as two 256-bit halves: docs/kernels.md). */
#define HAVE_HALVES 1
typedef __m256 vh;
static ALWAYS_INLINE vh vh_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE vh vh_load(const float *p) { return _mm256_loadu_ps(p); }
static ALWAYS_INLINE vh vh_fmadd(vh a, vh b, vh c) { return _mm256_fmadd_ps(a, b, c); }
static ALWAYS_INLINE vh vh_load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static ALWAYS_INLINE vh vh_load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static ALWAYS_INLINE vf vf_join(vh lo, vh hi) {  /* lanes 0-7 from lo, 8-15 from hi */
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
/* AMD family 19h with AVX-512 is Zen 4 (Zen 3, the same family, has none) */
#include <cpuid.h>
static inline bool amd_zen4(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u || d != 0x69746e65u || c != 0x444d4163u)
        return false;  /* not "AuthenticAMD" */
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    unsigned family = (a >> 8) & 0xf;
    return (family == 0xf ? family + ((a >> 20) & 0xff) : family) == 0x19;
}
#else
#ifdef __AVXVNNI__
#define KERNELS_NAME "avx2-vnni"  /* (q8_0 tiles by AVX-VNNI) */
#else
#define KERNELS_NAME "avx2"
#endif
enum { VL = 8 };
#define TILE_TOKENS 3       /* 12 of the 16 registers accumulate */
#define OP_ROWS 6           /* 12 + 2 + 1 of 16 */
#define SCORE_QUERIES 4     /* 4 queries x 16 keys: 8 accumulators */
#define PV_VECS 2           /* 4 x 2 of 16 registers */
typedef __m256 vf;
static ALWAYS_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE vf vf_set1(float a) { return _mm256_set1_ps(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static ALWAYS_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static ALWAYS_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static ALWAYS_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static ALWAYS_INLINE float vf_hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static ALWAYS_INLINE float vf_hmax(vf v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static ALWAYS_INLINE f4 vf_hsum4(vf a, vf b, vf c, vf d) {
    vf ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    vf cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    vf abcd = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
                            _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
static ALWAYS_INLINE vf vf_round(vf v) {
    return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static ALWAYS_INLINE vf vf_exp2i(vf k) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}
static ALWAYS_INLINE vf vf_load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static ALWAYS_INLINE vf vf_load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define HAVE_NEON 1
#ifdef __ARM_FEATURE_DOTPROD
#define KERNELS_NAME "neon-dotprod"
#else
#define KERNELS_NAME "neon"
#endif
enum { VL = 4 };
#define TILE_TOKENS 6       /* 24 of the 32 registers accumulate */
#define OP_ROWS 12          /* 24 + 2 + 1 of 32 */
#define SCORE_QUERIES 4     /* 4 queries x 16 keys: 16 accumulators */
#define PV_VECS 6           /* 4 x 6: 24 accumulators */
typedef float32x4_t vf;
typedef float32x4_t f4;
static ALWAYS_INLINE f4 f4_load(const float *p) { return vld1q_f32(p); }
static ALWAYS_INLINE void f4_store(float *p, f4 v) { vst1q_f32(p, v); }
static ALWAYS_INLINE f4 f4_add(f4 a, f4 b) { return vaddq_f32(a, b); }
static ALWAYS_INLINE vf vf_zero(void) { return vdupq_n_f32(0.0f); }
static ALWAYS_INLINE vf vf_set1(float a) { return vdupq_n_f32(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return vld1q_f32(p); }
static ALWAYS_INLINE void vf_store(float *p, vf v) { vst1q_f32(p, v); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return vaddq_f32(a, b); }
static ALWAYS_INLINE vf vf_sub(vf a, vf b) { return vsubq_f32(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return vmulq_f32(a, b); }
static ALWAYS_INLINE vf vf_div(vf a, vf b) { return vdivq_f32(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return vminq_f32(a, b); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return vmaxq_f32(a, b); }
static ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
static ALWAYS_INLINE float vf_hsum(vf v) { return vaddvq_f32(v); }
static ALWAYS_INLINE float vf_hmax(vf v) { return vmaxvq_f32(v); }
static ALWAYS_INLINE f4 vf_hsum4(vf a, vf b, vf c, vf d) {
    return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
}
static ALWAYS_INLINE vf vf_round(vf v) { return vrndnq_f32(v); }  /* to nearest, ties to even */
static ALWAYS_INLINE vf vf_exp2i(vf k) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(k), vdupq_n_s32(127)), 23));
}
static ALWAYS_INLINE vf vf_load_f16(const uint16_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}
static ALWAYS_INLINE vf vf_load_bf16(const uint16_t *p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}
#endif

/* The q8_0 layer: qi holds 4 bytes of each of Q8_LANES weight rows (4 consecutive columns, as a
 * panel stores them: model.h), or Q8_LANES int32 sums; qi_dot4 adds each lane's 4 byte products
 * to its sum. The byte products need one unsigned operand. AVX-512 VNNI: vpdpbusd on the weights
 * + 128 (an xor), which adds 128 x the token's sum of the group's codes to every lane, so each
 * sum starts at minus that (Q8_VNNI: KernelScratch.xqsum); AVX-VNNI, in AVX2 builds for the
 * machines that have it, the same on 256 bits. Plain AVX2: maddubs on |w| and x with w's sign
 * (|w| <= 128 and |x| <= 127, so the pairs never saturate), then madd sums the pairs. NEON
 * multiplies signed bytes: sdot where the machine has it, else smull into 16 bits and two
 * pairwise sums. */
#if defined(HAVE_AVX512) && defined(__AVX512VNNI__)
#define Q8_VNNI 1
#define Q8_LANES 16       /* rows per vector */
#define Q8_TILE_TOKENS 6  /* of 32 registers: 12 int32 sums, 12 f32 sums, 2 x 2 weights */
typedef __m512i qi;
typedef __m512 qf;
static ALWAYS_INLINE qi qi_load(const uint8_t *p) { return _mm512_loadu_si512(p); }
static ALWAYS_INLINE qi qi_set1(int32_t a) { return _mm512_set1_epi32(a); }
static ALWAYS_INLINE qi qi_unsigned(qi w) { return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); }
/* acc + the 4 byte products of each lane: wu = qi_unsigned(w) */
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) {
    (void)w;
    return _mm512_dpbusd_epi32(acc, wu, x4);
}
static ALWAYS_INLINE qf qf_scales(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static ALWAYS_INLINE qf qf_set1(float a) { return _mm512_set1_ps(a); }
static ALWAYS_INLINE qf qf_zero(void) { return _mm512_setzero_ps(); }
static ALWAYS_INLINE qf qf_fmadd_i(qi a, qf b, qf c) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), b, c); }
static ALWAYS_INLINE qf qf_mul(qf a, qf b) { return _mm512_mul_ps(a, b); }
static ALWAYS_INLINE void qf_store(float *p, qf v) { _mm512_storeu_ps(p, v); }
#elif defined(HAVE_NEON)
#define Q8_VNNI 0
#define Q8_LANES 4
#define Q8_TILE_TOKENS 6  /* of 32 registers: 12 int32 sums, 12 f32 sums, 2 weights, a broadcast */
typedef int32x4_t qi;     /* 4 int32 sums, or 16 bytes: 4 of each of 4 rows */
typedef float32x4_t qf;
static ALWAYS_INLINE qi qi_load(const uint8_t *p) { return vreinterpretq_s32_u8(vld1q_u8(p)); }
static ALWAYS_INLINE qi qi_set1(int32_t a) { return vdupq_n_s32(a); }
static ALWAYS_INLINE qi qi_unsigned(qi w) { return w; }  /* (signed products: nothing to do) */
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) {
    (void)wu;
    int8x16_t w8 = vreinterpretq_s8_s32(w), x8 = vreinterpretq_s8_s32(x4);
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, w8, x8);
#else
    int16x8_t lo = vmull_s8(vget_low_s8(w8), vget_low_s8(x8)), hi = vmull_high_s8(w8, x8); /* rows 0-1, 2-3 */
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}
static ALWAYS_INLINE qf qf_scales(const uint16_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}
static ALWAYS_INLINE qf qf_set1(float a) { return vdupq_n_f32(a); }
static ALWAYS_INLINE qf qf_zero(void) { return vdupq_n_f32(0.0f); }
static ALWAYS_INLINE qf qf_fmadd_i(qi a, qf b, qf c) { return vfmaq_f32(c, vcvtq_f32_s32(a), b); }
static ALWAYS_INLINE qf qf_mul(qf a, qf b) { return vmulq_f32(a, b); }
static ALWAYS_INLINE void qf_store(float *p, qf v) { vst1q_f32(p, v); }
#else  /* 256-bit vectors: the AVX2 build, and AVX-512 without VNNI */
#define Q8_LANES 8
typedef __m256i qi;
typedef __m256 qf;
static ALWAYS_INLINE qi qi_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static ALWAYS_INLINE qi qi_set1(int32_t a) { return _mm256_set1_epi32(a); }
#ifdef __AVXVNNI__  /* AVX-VNNI (Alder Lake and later, Zen 5): VNNI's vpdpbusd on 256 bits */
#define Q8_VNNI 1
#define Q8_TILE_TOKENS 3  /* of 16 registers: 6 int32 sums, 6 f32 sums, 2 weights, a broadcast */
static ALWAYS_INLINE qi qi_unsigned(qi w) { return _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)); }
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) {
    (void)w;
    return _mm256_dpbusd_avx_epi32(acc, wu, x4);
}
#else
#define Q8_VNNI 0
#define Q8_TILE_TOKENS 2  /* of 16 registers: 8 sums, 2 x 2 weights, a broadcast */
static ALWAYS_INLINE qi qi_unsigned(qi w) { return _mm256_sign_epi8(w, w); }  /* |w| */
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) {
    __m256i pairs = _mm256_maddubs_epi16(wu, _mm256_sign_epi8(x4, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
static ALWAYS_INLINE qf qf_scales(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static ALWAYS_INLINE qf qf_set1(float a) { return _mm256_set1_ps(a); }
static ALWAYS_INLINE qf qf_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE qf qf_fmadd_i(qi a, qf b, qf c) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), b, c); }
static ALWAYS_INLINE qf qf_mul(qf a, qf b) { return _mm256_mul_ps(a, b); }
static ALWAYS_INLINE void qf_store(float *p, qf v) { _mm256_storeu_ps(p, v); }
#endif
#define Q8_TILE_ROWS (2 * Q8_LANES)
/* a thread's share of rows is whole blocks: whole tiles, and whole panels for decoding (below) */
#define Q8_BLOCK_ROWS (Q8_TILE_ROWS > MM_Q8_PANEL ? Q8_TILE_ROWS : MM_Q8_PANEL)
_Static_assert(MM_Q8_PANEL % Q8_LANES == 0, "a vector of rows lies within one panel");
_Static_assert(Q8_TILE_TOKENS == 2 || Q8_TILE_TOKENS == 3 || Q8_TILE_TOKENS == 6,
               "q8_rows' switch covers these");


_Static_assert(TILE_ROWS == 4, "the tile epilogue sums four rows at once (vf_hsum4)");
_Static_assert((TILE_TOKENS == 3 || TILE_TOKENS == 6) && (SCORE_QUERIES == 4 || SCORE_QUERIES == 8) &&
                   (PV_VECS == 2 || PV_VECS == 6),
               "the switches of matmul_block, BY_QUERIES and pv_tiles cover these");

/* v, as a value the compiler must keep in a register: a vector loaded once for several FMAs is
 * otherwise often folded into each of them as a memory operand, which loads it again every time */
static ALWAYS_INLINE vf vf_keep(vf v) {
#ifdef HAVE_NEON
    __asm__("" : "+w"(v));  /* (a SIMD register) */
#else
    __asm__("" : "+v"(v));
#endif
    return v;
}

/* a hint to bring the cache line at p in before it is read (never a fault, whatever p) */
static ALWAYS_INLINE void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* the same for weights, which a token reads once each, start to end, with the non-temporal hint,
 * which keeps the stream from evicting the rest of the caches: the q8_0 tiles WEIGHTS_AHEAD bytes
 * ahead of their loads, decoding's f16 and bf16 rows HALF_ROWS_AHEAD; and decoding's f32, f16 and
 * bf16 rows one line of each 4 KB page PAGES_AHEAD bytes ahead (kernels.h; matmul.c).
 * Line by line, f32 rows are left to the hardware prefetcher, which read them as fast as any
 * distance did at two threads and faster at one (docs/kernels.md) */
#define WEIGHTS_AHEAD 2048
#define HALF_ROWS_AHEAD 8192
static ALWAYS_INLINE void prefetch_weights(const void *p) { __builtin_prefetch(p, 0, 0); }

/* exp(r) for r in [-87, 88.7], within 2 ulp of expf (and inf for r in [88.7, 89]): r = k ln2 + f
 * with k = round(r / ln2) and f in [-ln2/2, ln2/2] (ln2 in two parts, so f is exact), exp(f) by
 * its Taylor polynomial, times 2^k */
static ALWAYS_INLINE vf vf_exp(vf r) {
    static const float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                               1.6666665459e-1f, 5.0000001201e-1f};  /* exp(f) - 1 - f, over f^2 */
    vf k = vf_round(vf_mul(r, vf_set1(1.44269504f)));
    vf f = vf_fnmadd(k, vf_set1(-2.12194440e-4f), vf_fnmadd(k, vf_set1(0.693359375f), r));
    vf y = vf_set1(c[0]);
    for (int j = 1; j < 6; j++) y = vf_fmadd(y, f, vf_set1(c[j]));
    return vf_mul(vf_fmadd(y, vf_mul(f, f), vf_add(f, vf_set1(1.0f))), vf_exp2i(k));
}

/* VL weights from element i of p, as f32 */
static ALWAYS_INLINE vf load_w(int dtype, const void *p, size_t i) {
    if (dtype == MM_F32) return vf_load((const float *)p + i);
    if (dtype == MM_F16) return vf_load_f16((const uint16_t *)p + i);
    return vf_load_bf16((const uint16_t *)p + i);
}

#ifdef HAVE_HALVES
static ALWAYS_INLINE vh load_wh(int dtype, const void *p, size_t i) {  /* VL / 2 of them */
    if (dtype == MM_F32) return vh_load((const float *)p + i);
    if (dtype == MM_F16) return vh_load_f16((const uint16_t *)p + i);
    return vh_load_bf16((const uint16_t *)p + i);
}
#endif

static ALWAYS_INLINE float load1(int dtype, const void *p, size_t i) {
    if (dtype == MM_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dtype == MM_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

/* x quantised for q8_0 matrices: quantize_q8's codes and scales exactly. AVX2, which an AVX-512
 * machine runs too; NEON quantises with quantize_q8 itself (a small part of a matmul's time) */
#ifdef __AVX2__
static void quantize_q8_fast(int8_t *q, float *scale, const float *x, int n) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int g = 0; g < n / MM_Q8_GROUP; g++) {
        const float *xg = x + (size_t)g * MM_Q8_GROUP;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xg + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        __m256i i32[4];
        for (int j = 0; j < 4; j++) i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(id)));
        /* 32-bit -> 8-bit packs work within 128-bit lanes: put the bytes back in order */
        __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i i8 = _mm256_packs_epi16(i16a, i16b);
        i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + (size_t)g * MM_Q8_GROUP), i8);
        scale[g] = d;
    }
}
#else
static void quantize_q8_fast(int8_t *q, float *scale, const float *x, int n) { quantize_q8(q, scale, x, n); }
#endif

#endif  /* KERNELS_BUILT */

#endif
