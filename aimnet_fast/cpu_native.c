/* The fast CPU backend's native kernels (aimnet_fast/cpu_native.py compiles and loads this file).
 *
 * The centre sum of the AEV contractions, out[i, c, :] = sum over the terms t of atom i of
 * terms[t, c] * feat[feat_index[t], :], and its backward, for 16 features (one vector) and
 * channels in groups of 16. The terms are sorted by centre atom: atom i's are ptr[i] .. ptr[i+1]-1.
 * Each function works on the atoms a0 .. a1-1, so that a caller may split the atoms between threads
 * (the forward and d_terms write disjoint rows; d_feat is summed into, so each thread needs its own).
 *
 * Why native: torch composes this from gathers, padded rows, batched 16 x 16 products and an
 * index_add, each a pass over memory and each small (~2 ms of 10 for a 2,664-atom batch); here the
 * 16 x 16 accumulator of an atom stays in vector registers while its terms stream past.
 *
 * And the ELU of the MLPs, in place, in float (below the includes).
 *
 * No fast-math: every sum runs in a fixed order (lanes are independent), so results are the same
 * from call to call. The centre sums are compiled twice from this one file, for float (_f32) and
 * double (_f64).
 */
#include <stdint.h>
#include <string.h>

#ifndef REAL
#  define REAL float
#  define KERNEL(name) name##_f32
#  include __FILE__
#  undef REAL
#  undef KERNEL
#  define REAL double
#  define KERNEL(name) name##_f64
#  include __FILE__
#  undef REAL
#  undef KERNEL

/* expm1(x) for x <= 0 in float, within 0.9 ulp of the exact value (tests/test_cpu_native.py;
 * torch's float32 ELU: within 1.0):
 * x = n ln2 + r with |r| <= ln2 / 2, expm1(r) by its Taylor series to r^8 (the next term is below
 * 1e-9 of the result), then expm1(x) = 2^n expm1(r) + (2^n - 1), where 2^n - 1 is exact. Plain
 * arithmetic that the compiler vectorizes: torch's expm1 runs ~4x slower per element (its ELU was
 * ~10 % of prediction). */
static inline float expm1_nonpositive(float x)
{
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
    const float round_shift = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -18.0f ? -18.0f : x;            /* expm1 is -1 in float below */
    float n = (x * 1.44269504088896341f + round_shift) - round_shift;
    float r = (x - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 40320;
    p = p * r + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    float expm1_r = r + (r * r) * p;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return two_n * expm1_r + (two_n - 1.0f);
}

/* x = ELU(x) in place: x where x >= 0 (and NaN), alpha (e^x - 1) where x < 0 */
void elu_f32(float *restrict x, int64_t n, float alpha)
{
    for (int64_t i = 0; i < n; ++i) {
        float v = x[i];
        float e = alpha * expm1_nonpositive(v < 0.0f ? v : 0.0f);
        x[i] = v < 0.0f ? e : v;
    }
}

#else

/* 16 features of one row: one AVX-512 register in float, two in double (GCC and Clang vectors) */
typedef REAL KERNEL(vec16) __attribute__((vector_size(16 * sizeof(REAL))));
#define VEC KERNEL(vec16)

/* out (n_atoms, C, 16): atoms a0 .. a1-1 written whole (zeros for an atom without terms) */
void KERNEL(centre_sum)(const REAL *terms, int64_t C, const REAL *feat, const int64_t *ptr,
                        const int64_t *feat_index, int64_t a0, int64_t a1, REAL *out)
{
    for (int64_t i = a0; i < a1; ++i) {
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            VEC acc[16];
            memset(acc, 0, sizeof acc);
            for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
                VEC p;
                memcpy(&p, feat + feat_index[t] * 16, sizeof p);
                const REAL *g = terms + t * C + c0;
                for (int c = 0; c < 16; ++c) acc[c] += g[c] * p;
            }
            memcpy(out + (i * C + c0) * 16, acc, sizeof acc);
        }
    }
}

/* d_terms[t, c] = d_out[i, c, :] . feat[feat_index[t], :] for the terms of atoms a0 .. a1-1,
 * stored at d_terms + t * st + c * sc; d_feat (K, 16) += sum over c of terms[t, c] * d_out[i, c, :].
 * d_out's atoms lie d_out_stride apart (a column slice of a wider gradient needs no copy). Either
 * output may be NULL (not needed). */
void KERNEL(centre_sum_backward)(const REAL *terms, int64_t C, const REAL *feat,
                                 const int64_t *ptr, const int64_t *feat_index, int64_t a0,
                                 int64_t a1, const REAL *d_out, int64_t d_out_stride,
                                 REAL *d_terms, int64_t st, int64_t sc, REAL *d_feat)
{
    for (int64_t i = a0; i < a1; ++i) {
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const REAL *d = d_out + i * d_out_stride + c0 * 16;
            if (d_terms) {
                VEC dt[16];  /* d transposed, dt[f][c] = d[c][f]: one term's 16 sums in one vector */
                for (int f = 0; f < 16; ++f)
                    for (int c = 0; c < 16; ++c) dt[f][c] = d[c * 16 + f];
                for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
                    const REAL *p = feat + feat_index[t] * 16;
                    VEC s = p[0] * dt[0];
                    for (int f = 1; f < 16; ++f) s += p[f] * dt[f];
                    REAL *row = d_terms + t * st + c0 * sc;
                    if (sc == 1) memcpy(row, &s, sizeof s);
                    else for (int c = 0; c < 16; ++c) row[c * sc] = s[c];
                }
            }
            if (d_feat) {
                VEC dv[16];
                memcpy(dv, d, sizeof dv);
                for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
                    const REAL *g = terms + t * C + c0;
                    VEC s = g[0] * dv[0];
                    for (int c = 1; c < 16; ++c) s += g[c] * dv[c];
                    REAL *row = d_feat + feat_index[t] * 16;
                    VEC q;
                    memcpy(&q, row, sizeof q);
                    q += s;
                    memcpy(row, &q, sizeof q);
                }
            }
        }
    }
}

#undef VEC
#endif
