/* The fast CPU backend's native kernels (aimnet_fast/cpu_native.py compiles and loads this file).
 *
 * The centre sum of the AEV contractions, out[i, c, :] = sum over the terms t of atom i of
 * terms[t, c] * feat[feat_index[t], :], and its backward, for 16 features (one vector) and
 * channels in groups of 16. The terms are sorted by centre atom: atom i's are ptr[i] .. ptr[i+1]-1.
 *
 * Why native: torch composes this from gathers, padded rows, batched 16 x 16 products and an
 * index_add, each a pass over memory and each small (~2 ms of 10 for a 2,664-atom batch); here the
 * 16 x 16 accumulator of an atom stays in vector registers while its terms stream past.
 *
 * The AEV terms from the coordinates and their coordinate gradients (below the centre sums).
 * And the ELU of the MLPs, in place, in float, and the MLPs' matrix products at few rows from
 * weights packed once, in float (below the includes).
 *
 * No fast-math: every sum runs in a fixed order (lanes are independent), so results are the same
 * from call to call. The centre sums and the terms are compiled twice from this one file, for float
 * (_f32) and double (_f64).
 */
#ifndef AIMNET_FAST_NATIVE_COMMON
#define AIMNET_FAST_NATIVE_COMMON
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifndef M_PI
#  define M_PI 3.14159265358979323846
#endif
/* Threads: OpenMP where compiled with it. Loaded into a torch process, the library shares torch's
 * libgomp (same soname, already loaded), so its loops run on torch's threads, as many as
 * torch.set_num_threads says; threads of a second pool would wait behind torch's spinning ones.
 * Loops that add into shared rows (d_feat, d_coord) give each thread rows of its own, summed
 * after, over a static split of the work: the same sums for the same number of threads. */
#ifdef _OPENMP
#  include <omp.h>
#  define MAX_THREADS omp_get_max_threads()
#  define THREAD_ID omp_get_thread_num()
#else
#  define MAX_THREADS 1
#  define THREAD_ID 0
#endif
/* below this many terms (elements for the ELU) a loop runs on the calling thread alone */
#define PARALLEL_MIN_TERMS 2048
#define PARALLEL_MIN_ELEMENTS 65536

/* rows (n_rows) of `width` to add into, one set per thread beyond the first (which adds into
 * `out` itself); NULL (one thread) when small or out of memory */
static inline void *thread_rows(int64_t work, int64_t n_rows, int64_t width, size_t size,
                                int *n_threads)
{
    *n_threads = work >= PARALLEL_MIN_TERMS ? MAX_THREADS : 1;
    if (*n_threads <= 1) return NULL;
    void *rows = calloc((size_t)(*n_threads - 1) * (size_t)(n_rows * width), size);
    if (!rows) *n_threads = 1;
    return rows;
}
#endif

#ifndef REAL
#  define REAL float
#  define KERNEL(name) name##_f32
#  define MATH(name) name##f
#  include __FILE__
#  undef REAL
#  undef KERNEL
#  undef MATH
#  define REAL double
#  define KERNEL(name) name##_f64
#  define MATH(name) name
#  include __FILE__
#  undef REAL
#  undef KERNEL
#  undef MATH

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

/* ptr (n_atoms + 1): where the terms of each atom start, for terms sorted by centre atom.
 * Returns 0; 1 where the centres are not sorted (ptr unfinished); 2 where one lies outside
 * [0, n_atoms). */
int64_t csr_offsets(const int64_t *centre, int64_t n, int64_t n_atoms, int64_t *ptr)
{
    int64_t atom = 0;
    ptr[0] = 0;
    for (int64_t t = 0; t < n; ++t) {
        int64_t c = centre[t];
        if (c < 0 || c >= n_atoms) return 2;
        if (c < atom) return 1;
        while (atom < c) ptr[++atom] = t;
    }
    while (atom < n_atoms) ptr[++atom] = n;
    return 0;
}

/* -- neighbor lists (index tensors only) ------------------------------------------------------
 * As aimnet_fast/neighbors.py: the triplets (i; j < k) of pairs (i, j) sorted by i then j, in the
 * order (i, j, k); the unique (j, k) of the triplets sorted by j then k, and each triplet's index
 * into them. */

/* the number of triplets of the pairs (2, n) */
int64_t triplet_count(const int64_t *pairs, int64_t n)
{
    int64_t total = 0;
    for (int64_t s = 0, e; s < n; s = e) {
        for (e = s + 1; e < n && pairs[e] == pairs[s]; ++e) {}
        total += (e - s) * (e - s - 1) / 2;
    }
    return total;
}

/* triplets (3, T), T = triplet_count(pairs, n) */
void triplets_from_pairs(const int64_t *pairs, int64_t n, int64_t *triplets, int64_t n_triplets)
{
    const int64_t *j = pairs + n;
    int64_t t = 0;
    for (int64_t s = 0, e; s < n; s = e) {
        for (e = s + 1; e < n && pairs[e] == pairs[s]; ++e) {}
        for (int64_t a = s; a < e; ++a)
            for (int64_t b = a + 1; b < e; ++b, ++t) {
                triplets[t] = pairs[s];
                triplets[n_triplets + t] = j[a];
                triplets[2 * n_triplets + t] = j[b];
            }
    }
}

/* The unique (j, k) of the triplets (3, n) of n_atoms atoms: written to out (2, n) as its first
 * Q columns (row stride n), Q returned; triplet_pair (n,) each triplet's column. work: 2 n_atoms
 * + 1 + n int64. The triplets are bucketed by j; in each bucket its distinct k are sorted (few:
 * the atoms within the angular cutoff of j's neighbors). */
int64_t unique_pairs(const int64_t *triplets, int64_t n, int64_t n_atoms, int64_t *work,
                     int64_t *out, int64_t *triplet_pair)
{
    const int64_t *tj = triplets + n, *tk = triplets + 2 * n;
    int64_t *start = work, *order = work + n_atoms + 1, *mark = order + n;
    memset(start, 0, sizeof(int64_t) * (n_atoms + 1));
    for (int64_t t = 0; t < n; ++t) start[tj[t] + 1]++;
    for (int64_t a = 0; a < n_atoms; ++a) start[a + 1] += start[a];
    memcpy(mark, start, sizeof(int64_t) * n_atoms);          /* the next free slot of each bucket */
    for (int64_t t = 0; t < n; ++t) order[mark[tj[t]]++] = t;
    for (int64_t a = 0; a < n_atoms; ++a) mark[a] = -1;      /* k's column, once seen */
    int64_t *out_j = out, *out_k = out + n, q = 0;
    for (int64_t j = 0; j < n_atoms; ++j) {
        int64_t first = q;
        for (int64_t b = start[j]; b < start[j + 1]; ++b) {
            int64_t k = tk[order[b]];
            if (mark[k] < first) {                           /* not yet seen in this bucket */
                mark[k] = q;
                out_k[q++] = k;
            }
        }
        for (int64_t x = first + 1; x < q; ++x)              /* insertion sort of the k */
            for (int64_t y = x; y > first && out_k[y - 1] > out_k[y]; --y) {
                int64_t tmp = out_k[y - 1];
                out_k[y - 1] = out_k[y];
                out_k[y] = tmp;
            }
        for (int64_t x = first; x < q; ++x) {
            out_j[x] = j;
            mark[out_k[x]] = x;
        }
        for (int64_t b = start[j]; b < start[j + 1]; ++b) triplet_pair[order[b]] = mark[tk[order[b]]];
    }
    return q;
}

/* 1 where any of the n indices lies outside [0, bound), else 0 */
int64_t out_of_range(const int64_t *index, int64_t n, int64_t bound)
{
    int64_t bad = 0;
    for (int64_t t = 0; t < n; ++t) bad |= index[t] < 0 || index[t] >= bound;
    return bad;
}

/* x = ELU(x) in place: x where x >= 0 (and NaN), alpha (e^x - 1) where x < 0 */
void elu_f32(float *restrict x, int64_t n, float alpha)
{
    #pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < n; ++i) {
        float v = x[i];
        float e = alpha * expm1_nonpositive(v < 0.0f ? v : 0.0f);
        x[i] = v < 0.0f ? e : v;
    }
}

/* Matrix products of the MLPs at few rows (float): out (M x N) = x (M x K) @ B (+ bias).
 *
 * Why: a small molecule's MLP products have as many rows as it has atoms (21 for a water
 * heptamer), where MKL ran at ~65 % of its speed at 512 rows: it packs the weights anew at every
 * call and its tiles fit 21 rows badly. Here B is packed once per weight (panels of 32 columns,
 * packed[p][k][0..31], zeros past N) and each tile of MATMUL_ROWS rows x 32 columns keeps its
 * sums in vector registers while the panel streams past: 1.5x MKL's speed at 21 rows on the
 * 2-core AMD CPU (bench/RESULTS.md). Each output is one tile's sum in k order, whatever the
 * number of threads. */
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_unaligned __attribute__((vector_size(64), aligned(4)));
#define MATMUL_PANEL 32
#ifdef __AVX512F__
#  define MATMUL_ROWS 7   /* 14 accumulators + 2 panel vectors of the 32 zmm registers */
#else
#  define MATMUL_ROWS 3   /* 16 ymm (AVX2) or 32 128-bit (NEON) registers */
#endif
/* rows of x a thread's tiles take before the next panel: x's block stays in L2 */
#define MATMUL_BLOCK_ROWS (8 * MATMUL_ROWS)
#define PARALLEL_MIN_PRODUCTS (1 << 21)
/* k steps summed in registers before they are added to the output: sums of MATMUL_DEPTH
 * products then of the partial sums, nearer MKL's rounding than one sum over all k */
#define MATMUL_DEPTH 128

/* packed (ceil(N / 32), K, 32) from B[k][n] = b[k * stride_k + n * stride_n] (K x N) */
void pack_panels_f32(const float *b, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n,
                     float *packed)
{
    int64_t n_panels = (N + MATMUL_PANEL - 1) / MATMUL_PANEL;
    for (int64_t p = 0; p < n_panels; ++p)
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < MATMUL_PANEL; ++j) {
                int64_t n = p * MATMUL_PANEL + j;
                packed[(p * K + k) * MATMUL_PANEL + j] = n < N ? b[k * stride_k + n * stride_n] : 0.0f;
            }
}

/* ELU (alpha) of the 32 values at o, in place: as elu_f32 */
static inline void elu_32(float *o, float alpha)
{
    for (int j = 0; j < MATMUL_PANEL; ++j) {
        float v = o[j];
        float e = alpha * expm1_nonpositive(v < 0.0f ? v : 0.0f);
        o[j] = v < 0.0f ? e : v;
    }
}

/* one tile: `rows` (<= MATMUL_ROWS) rows of x by one panel over k in [k0, k1); `cols` (<= 32)
 * columns stored, the sums added to out unless `first` (then bias added, if any); `elu`: the
 * last k range, so the ELU (alpha) of the finished sums is stored */
static inline void matmul_tile(const float *x, int64_t ldx, int rows, int64_t k0, int64_t k1,
                               const float *panel, const float *bias, int first, int elu,
                               float alpha, float *out, int64_t ldo, int cols)
{
    f32x16 acc[MATMUL_ROWS][2];
    for (int r = 0; r < MATMUL_ROWS; ++r) acc[r][0] = acc[r][1] = (f32x16){0};
    if (rows == MATMUL_ROWS) {
        for (int64_t k = k0; k < k1; ++k) {
            f32x16 b0 = *(const f32x16_unaligned *)(panel + k * MATMUL_PANEL);
            f32x16 b1 = *(const f32x16_unaligned *)(panel + k * MATMUL_PANEL + 16);
            #pragma GCC unroll 8
            for (int r = 0; r < MATMUL_ROWS; ++r) {
                float a = x[r * ldx + k];
                acc[r][0] += a * b0;
                acc[r][1] += a * b1;
            }
        }
    } else {
        for (int64_t k = k0; k < k1; ++k) {
            f32x16 b0 = *(const f32x16_unaligned *)(panel + k * MATMUL_PANEL);
            f32x16 b1 = *(const f32x16_unaligned *)(panel + k * MATMUL_PANEL + 16);
            for (int r = 0; r < rows; ++r) {
                float a = x[r * ldx + k];
                acc[r][0] += a * b0;
                acc[r][1] += a * b1;
            }
        }
    }
    for (int r = 0; r < rows; ++r) {
        float *o = out + r * ldo;
        float sums[MATMUL_PANEL];
        f32x16 lo = acc[r][0], hi = acc[r][1];
        if (!first) {  /* cols of o are ours; the rest of the 32 are not read */
            float before[MATMUL_PANEL] = {0};
            memcpy(before, o, (size_t)cols * sizeof(float));
            lo += *(const f32x16_unaligned *)before;
            hi += *(const f32x16_unaligned *)(before + 16);
        } else if (bias) {
            float b[MATMUL_PANEL] = {0};
            memcpy(b, bias, (size_t)cols * sizeof(float));
            lo += *(const f32x16_unaligned *)b;
            hi += *(const f32x16_unaligned *)(b + 16);
        }
        memcpy(sums, &lo, sizeof lo);
        memcpy(sums + 16, &hi, sizeof hi);
        if (elu) elu_32(sums, alpha);
        memcpy(o, sums, (size_t)cols * sizeof(float));
    }
}

/* out (M x N, rows ldo apart) = x (M x K, rows ldx apart, columns adjacent) @ B + bias (N, or
 * NULL), B packed by pack_panels_f32; then out = ELU(out) with alpha where `elu` */
void matmul_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                const float *bias, int64_t elu, float alpha, float *out, int64_t ldo)
{
    int64_t n_panels = (N + MATMUL_PANEL - 1) / MATMUL_PANEL;
    int64_t n_blocks = (M + MATMUL_BLOCK_ROWS - 1) / MATMUL_BLOCK_ROWS;
    #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_PRODUCTS)
    for (int64_t item = 0; item < n_blocks * n_panels; ++item) {
        int64_t block = item / n_panels, p = item % n_panels;
        int64_t m_end = (block + 1) * MATMUL_BLOCK_ROWS < M ? (block + 1) * MATMUL_BLOCK_ROWS : M;
        int cols = (int)(N - p * MATMUL_PANEL < MATMUL_PANEL ? N - p * MATMUL_PANEL : MATMUL_PANEL);
        for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += MATMUL_DEPTH) {
            int64_t k1 = k0 + MATMUL_DEPTH < K ? k0 + MATMUL_DEPTH : K;
            for (int64_t m = block * MATMUL_BLOCK_ROWS; m < m_end; m += MATMUL_ROWS) {
                int rows = (int)(m_end - m < MATMUL_ROWS ? m_end - m : MATMUL_ROWS);
                matmul_tile(x + m * ldx, ldx, rows, k0, k1, packed + p * K * MATMUL_PANEL,
                            bias ? bias + p * MATMUL_PANEL : NULL, k0 == 0, elu && k1 == K,
                            alpha, out + m * ldo + p * MATMUL_PANEL, ldo, cols);
            }
        }
    }
}

#else

/* 16 features of one row: one AVX-512 register in float, two in double (GCC and Clang vectors) */
typedef REAL KERNEL(vec16) __attribute__((vector_size(16 * sizeof(REAL))));
#define VEC KERNEL(vec16)

/* This thread's rows to add into: `out` itself for thread 0, else its set of `extra` (from
 * thread_rows), n_values each */
static inline REAL *KERNEL(own_rows)(REAL *out, REAL *extra, int64_t n_values)
{
    int id = THREAD_ID;
    return id == 0 ? out : extra + (id - 1) * n_values;
}

/* out += every other thread's rows; called by every thread of the team (a worksharing loop) */
static inline void KERNEL(add_thread_rows)(REAL *out, const REAL *extra, int64_t n_values,
                                           int n_threads)
{
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < n_values; ++r)
        for (int u = 1; u < n_threads; ++u) out[r] += extra[(u - 1) * n_values + r];
}

/* out (n_atoms, C, 16), every atom written whole (zeros for an atom without terms) */
void KERNEL(centre_sum)(const REAL *terms, int64_t C, const REAL *feat, const int64_t *ptr,
                        const int64_t *feat_index, int64_t n_atoms, REAL *out)
{
    #pragma omp parallel for schedule(guided) if (ptr[n_atoms] >= PARALLEL_MIN_TERMS)
    for (int64_t i = 0; i < n_atoms; ++i) {
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

/* d_terms[t, c] = d_out[i, c, :] . feat[feat_index[t], :] for every term,
 * stored at d_terms + t * st + c * sc; d_feat (n_feat_rows, 16) += sum over c of
 * terms[t, c] * d_out[i, c, :]. d_out's atoms lie d_out_stride apart (a column slice of a wider
 * gradient needs no copy). Either output may be NULL (not needed). */
void KERNEL(centre_sum_backward)(const REAL *terms, int64_t C, const REAL *feat,
                                 int64_t n_feat_rows, const int64_t *ptr,
                                 const int64_t *feat_index, int64_t n_atoms,
                                 const REAL *d_out, int64_t d_out_stride, REAL *d_terms,
                                 int64_t st, int64_t sc, int64_t add_terms, REAL *d_feat)
{
    int64_t n_terms = ptr[n_atoms];
    if (d_terms) {
        #pragma omp parallel for schedule(guided) if (n_terms >= PARALLEL_MIN_TERMS)
        for (int64_t i = 0; i < n_atoms; ++i) {
            for (int64_t c0 = 0; c0 < C; c0 += 16) {
                const REAL *d = d_out + i * d_out_stride + c0 * 16;
                VEC dt[16];  /* d transposed, dt[f][c] = d[c][f]: a term's 16 sums in one vector */
                for (int f = 0; f < 16; ++f)
                    for (int c = 0; c < 16; ++c) dt[f][c] = d[c * 16 + f];
                for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
                    const REAL *p = feat + feat_index[t] * 16;
                    VEC s = p[0] * dt[0];
                    for (int f = 1; f < 16; ++f) s += p[f] * dt[f];
                    REAL *row = d_terms + t * st + c0 * sc;
                    if (add_terms) {
                        for (int c = 0; c < 16; ++c) row[c * sc] += s[c];
                    } else if (sc == 1) {
                        memcpy(row, &s, sizeof s);
                    } else {
                        for (int c = 0; c < 16; ++c) row[c * sc] = s[c];
                    }
                }
            }
        }
    }
    if (!d_feat) return;
    int n_threads;
    REAL *extra = thread_rows(n_terms, n_feat_rows, 16, sizeof(REAL), &n_threads);
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        REAL *mine = KERNEL(own_rows)(d_feat, extra, n_feat_rows * 16);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n_atoms; ++i) {
            for (int64_t c0 = 0; c0 < C; c0 += 16) {
                VEC dv[16];
                memcpy(dv, d_out + i * d_out_stride + c0 * 16, sizeof dv);
                for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
                    const REAL *g = terms + t * C + c0;
                    VEC s = g[0] * dv[0];
                    for (int c = 1; c < 16; ++c) s += g[c] * dv[c];
                    REAL *row = mine + feat_index[t] * 16;
                    VEC q;
                    memcpy(&q, row, sizeof q);
                    q += s;
                    memcpy(row, &q, sizeof q);
                }
            }
        }
        KERNEL(add_thread_rows)(d_feat, extra, n_feat_rows * 16, n_threads);
    }
    free(extra);
}

/* -- the AEV terms, from the coordinates ------------------------------------------------------
 * As aimnet_fast/aev.py: fc(d) = 0.5 cos(pi min(d / Rc, 1)) + 0.5; the radial terms
 * g[p, s] = exp(-eta (d - shift_s)^2) fc(d), the exponent floored at exp_floor (where torch's
 * vectorized exp takes a slow path, cpu_aev._exp_floored); the angular terms
 * g[t, z * 4 + a] = 2^(1 - zeta) fc(d_ij) fc(d_ik) (1 + cos(theta - theta_z))^8
 *                   exp(-eta ((d_ij + d_ik) / 2 - shift_a)^2),
 * cos(theta - theta_z) = cos theta cos theta_z + sin theta sin theta_z, cos theta clamped to
 * +-cos_clamp (no gradient where clamped). The backwards recompute what they need from the
 * coordinates (nothing is kept between forward and backward) and add each term's gradient into
 * d_coord of its atoms, in the order of the terms (the same sums every call). Bond vectors
 * r_ij = coord[j] - coord[i]. */

static inline REAL KERNEL(cutoff)(REAL d, REAL cutoff)
{
    REAL x = d / cutoff;
    return (REAL)0.5 * MATH(cos)((REAL)M_PI * (x < 1 ? x : 1)) + (REAL)0.5;
}

/* dfc/dd: zero beyond the cutoff, as the reference's clamp makes it */
static inline REAL KERNEL(cutoff_slope)(REAL d, REAL cutoff)
{
    REAL x = d / cutoff;
    return x <= 1 ? (REAL)(-0.5 * M_PI) / cutoff * MATH(sin)((REAL)M_PI * x) : 0;
}

static inline void KERNEL(bond)(const REAL *coord, int64_t i, int64_t j, REAL r[3])
{
    for (int x = 0; x < 3; ++x) r[x] = coord[j * 3 + x] - coord[i * 3 + x];
}

static inline REAL KERNEL(norm)(const REAL r[3])
{
    return MATH(sqrt)(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
}

/* exp(-eta sh^2), the exponent floored at exp_floor */
static inline REAL KERNEL(gauss)(REAL sh, REAL eta, REAL exp_floor)
{
    REAL e = -eta * (sh * sh);
    return MATH(exp)(e > exp_floor ? e : exp_floor);
}

/* g (P, 16) for the pairs (i, j) = (pairs[p], pairs[n_pairs + p]) */
void KERNEL(radial_terms)(const REAL *coord, const int64_t *pairs, int64_t n_pairs,
                          const REAL *shifts, REAL eta, REAL cutoff, REAL exp_floor, REAL *g)
{
    #pragma omp parallel for schedule(static) if (n_pairs >= PARALLEL_MIN_TERMS)
    for (int64_t p = 0; p < n_pairs; ++p) {
        REAL r[3];
        KERNEL(bond)(coord, pairs[p], pairs[n_pairs + p], r);
        REAL d = KERNEL(norm)(r), fc = KERNEL(cutoff)(d, cutoff);
        for (int s = 0; s < 16; ++s) g[p * 16 + s] = KERNEL(gauss)(d - shifts[s], eta, exp_floor) * fc;
    }
}

/* d_coord (N, 3) += the coordinate gradient of sum(d_g * g); d_g (P, 16) with strides (st, sc) */
void KERNEL(radial_terms_backward)(const REAL *coord, int64_t n_atoms, const int64_t *pairs,
                                   int64_t n_pairs, const REAL *shifts, REAL eta, REAL cutoff,
                                   REAL exp_floor, const REAL *d_g, int64_t st, int64_t sc,
                                   REAL *d_coord)
{
    int n_threads;
    REAL *extra = thread_rows(n_pairs, n_atoms, 3, sizeof(REAL), &n_threads);
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
    REAL *mine = KERNEL(own_rows)(d_coord, extra, n_atoms * 3);
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < n_pairs; ++p) {
        int64_t i = pairs[p], j = pairs[n_pairs + p];
        REAL r[3];
        KERNEL(bond)(coord, i, j, r);
        REAL d = KERNEL(norm)(r), fc = KERNEL(cutoff)(d, cutoff);
        REAL by_gauss = 0, by_slope = 0;  /* sum dG gauss, sum dG gauss (d - s) */
        for (int s = 0; s < 16; ++s) {
            REAL sh = d - shifts[s];
            REAL gg = d_g[p * st + s * sc] * KERNEL(gauss)(sh, eta, exp_floor);
            by_gauss += gg;
            by_slope += gg * sh;
        }
        REAL d_d = fc * (-2 * eta) * by_slope + KERNEL(cutoff_slope)(d, cutoff) * by_gauss;
        for (int x = 0; x < 3; ++x) {
            REAL v = d_d / d * r[x];
            mine[j * 3 + x] += v;
            mine[i * 3 + x] -= v;
        }
    }
    KERNEL(add_thread_rows)(d_coord, extra, n_atoms * 3, n_threads);
    }
    free(extra);
}

/* the factors of one triplet's terms (see angular_terms) */
typedef struct {
    REAL r_ij[3], r_ik[3], d_ij, d_ik, cos_raw, cos, sin, fc_ij, fc_ik;
    REAL base[8], ang[8], shifted[4], rad[4];
} KERNEL(angular_parts);

static inline void KERNEL(angular_factors)(const REAL *coord, const int64_t *triplets,
                                           int64_t n, int64_t t, const REAL *sectors,
                                           const REAL *shifts, REAL eta, REAL cutoff,
                                           REAL cos_clamp, KERNEL(angular_parts) *q)
{
    int64_t i = triplets[t];
    KERNEL(bond)(coord, i, triplets[n + t], q->r_ij);
    KERNEL(bond)(coord, i, triplets[2 * n + t], q->r_ik);
    const REAL *a = q->r_ij, *b = q->r_ik;
    q->d_ij = KERNEL(norm)(a);
    q->d_ik = KERNEL(norm)(b);
    q->cos_raw = (a[0] * b[0] + a[1] * b[1] + a[2] * b[2]) / (q->d_ij * q->d_ik);
    q->cos = q->cos_raw < -cos_clamp ? -cos_clamp : (q->cos_raw > cos_clamp ? cos_clamp : q->cos_raw);
    q->sin = MATH(sqrt)(1 - q->cos * q->cos);
    q->fc_ij = KERNEL(cutoff)(q->d_ij, cutoff);
    q->fc_ik = KERNEL(cutoff)(q->d_ik, cutoff);
    for (int z = 0; z < 8; ++z) {
        REAL base = 1 + sectors[2 * z] * q->cos + sectors[2 * z + 1] * q->sin;
        REAL b2 = base * base, b4 = b2 * b2;
        q->base[z] = base;
        q->ang[z] = b4 * b4;
    }
    REAL mean = (REAL)0.5 * (q->d_ij + q->d_ik);
    for (int s = 0; s < 4; ++s) {
        q->shifted[s] = mean - shifts[s];
        q->rad[s] = MATH(exp)(-eta * (q->shifted[s] * q->shifted[s]));
    }
}

/* g (T, 32) for the triplets (i, j, k) = (triplets[t], triplets[T + t], triplets[2T + t]);
 * sectors (8, 2): cos and sin of theta_z; scale = 2^(1 - zeta), zeta = 8 */
void KERNEL(angular_terms)(const REAL *coord, const int64_t *triplets, int64_t n,
                           const REAL *sectors, const REAL *shifts, REAL eta, REAL cutoff,
                           REAL cos_clamp, REAL scale, REAL *g)
{
    #pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_TERMS)
    for (int64_t t = 0; t < n; ++t) {
        KERNEL(angular_parts) q;
        KERNEL(angular_factors)(coord, triplets, n, t, sectors, shifts, eta, cutoff, cos_clamp, &q);
        REAL fc = scale * q.fc_ij * q.fc_ik;
        for (int z = 0; z < 8; ++z)
            for (int s = 0; s < 4; ++s) g[t * 32 + z * 4 + s] = fc * q.ang[z] * q.rad[s];
    }
}

/* d_coord (N, 3) += the coordinate gradient of sum(d_g * g); d_g (T, 32) with strides (st, sc) */
void KERNEL(angular_terms_backward)(const REAL *coord, int64_t n_atoms, const int64_t *triplets,
                                    int64_t n, const REAL *sectors, const REAL *shifts, REAL eta,
                                    REAL cutoff, REAL cos_clamp, REAL scale, const REAL *d_g,
                                    int64_t st, int64_t sc, REAL *d_coord)
{
    int n_threads;
    REAL *extra = thread_rows(n, n_atoms, 3, sizeof(REAL), &n_threads);
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
    REAL *mine = KERNEL(own_rows)(d_coord, extra, n_atoms * 3);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
        KERNEL(angular_parts) q;
        KERNEL(angular_factors)(coord, triplets, n, t, sectors, shifts, eta, cutoff, cos_clamp, &q);
        REAL by_sector[8], by_shell[4] = {0, 0, 0, 0};  /* sum_a dG rad, sum_z dG ang */
        for (int z = 0; z < 8; ++z) {
            by_sector[z] = 0;
            for (int s = 0; s < 4; ++s) {
                REAL dg = d_g[t * st + (z * 4 + s) * sc];
                by_sector[z] += dg * q.rad[s];
                by_shell[s] += dg * q.ang[z];
            }
        }
        REAL fc = scale * q.fc_ij * q.fc_ik;
        REAL d_fc = 0, d_cos_c = 0, d_cos_s = 0, d_mean = 0;
        for (int z = 0; z < 8; ++z) {
            REAL b = q.base[z], b2 = b * b;
            REAL d_base = 8 * fc * by_sector[z] * (b2 * b2 * b2 * b);   /* d (b^8) = 8 b^7 */
            d_fc += by_sector[z] * q.ang[z];
            d_cos_c += d_base * sectors[2 * z];
            d_cos_s += d_base * sectors[2 * z + 1];
        }
        d_fc *= scale;                                   /* d of fc(d_ij) fc(d_ik) */
        /* d/d cos of cos cos_z + sqrt(1 - cos^2) sin_z is cos_z - (cos / sin) sin_z */
        REAL d_cos = MATH(fabs)(q.cos_raw) <= cos_clamp ? d_cos_c - d_cos_s * q.cos / q.sin : 0;
        for (int s = 0; s < 4; ++s) d_mean += by_shell[s] * q.rad[s] * q.shifted[s];
        d_mean *= (-2 * eta) * fc;
        REAL d_dot = d_cos / (q.d_ij * q.d_ik);
        REAL dd_ij = (REAL)0.5 * d_mean + d_fc * KERNEL(cutoff_slope)(q.d_ij, cutoff) * q.fc_ik
                     - d_cos * q.cos_raw / q.d_ij;
        REAL dd_ik = (REAL)0.5 * d_mean + d_fc * q.fc_ij * KERNEL(cutoff_slope)(q.d_ik, cutoff)
                     - d_cos * q.cos_raw / q.d_ik;
        int64_t i = triplets[t], j = triplets[n + t], k = triplets[2 * n + t];
        for (int x = 0; x < 3; ++x) {
            REAL v_ij = d_dot * q.r_ik[x] + dd_ij / q.d_ij * q.r_ij[x];
            REAL v_ik = d_dot * q.r_ij[x] + dd_ik / q.d_ik * q.r_ik[x];
            mine[j * 3 + x] += v_ij;
            mine[k * 3 + x] += v_ik;
            mine[i * 3 + x] -= v_ij + v_ik;
        }
    }
    KERNEL(add_thread_rows)(d_coord, extra, n_atoms * 3, n_threads);
    }
    free(extra);
}

#undef VEC
#endif
