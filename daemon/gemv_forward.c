/* Run MLX's few-row cblas_sgemm calls (1 <= m <= 32 rows) in a kernel that reads the weights once.
 *
 * MLX's CPU backend issues every float32 product as cblas_sgemm, including the few-row products
 * of a decode step or a short prefill (x @ W.T with x of shape m x K). OpenBLAS 0.3.21 (Debian
 * 12) runs those as a general GEMM that packs B and works far below the memory bound: 4 rows by
 * a 576 x 49,152 embedding took as long as 16 rows should. A product with few rows is bound by
 * reading B, so this kernel streams each row (or column block) of B once and computes all m
 * results from it while it is in L1. agentd.blas preloads this library in front of a system
 * OpenBLAS (LD_PRELOAD=this:libopenblas.so.0); MLX's dynamic lookup of cblas_sgemm lands here,
 * and every call this file does not take goes on to the next definition, OpenBLAS's, unchanged.
 *
 * Batch invariance: every element of C is computed by the same instruction sequence whatever m
 * is and wherever the element falls in a tile (tiles are padded by repeating a row, never by a
 * different code path), so row i of a 4-row product is bit-identical to the same row computed
 * alone. A batched decode step therefore gives each sequence the logits it would get by itself.
 *
 * Built by agentd.blas with -O3 -march=native when the compiler accepts it (the library is built
 * on, and cached for, the machine that runs it), else -O3 for the generic target: the vector
 * width below follows what the target offers.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };
enum { MAX_ROWS = 32 };        /* products with more rows go to OpenBLAS (prefill chunks) */
enum { MAX_PACKED = 1 << 22 }; /* floats of A this file repacks at most (16 MiB) */
enum { MAX_THREADS = 8 };
/* Below this many floats of B a second thread's wake-up costs more than it saves. */
enum { SPLIT_MIN_B = 1 << 18 };
/* ... unless the rows make it compute-bound: 22 rows by the 192 x 576 k/v projections ran on one
 * thread (117 us) where two take ~65 us. */
enum { SPLIT_MIN_WORK = 1 << 21 };

#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__) || defined(__ARM_FEATURE_SVE)
#define VEC 8
#else
#define VEC 4
#endif
typedef float vf __attribute__((vector_size(VEC * 4)));

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);

static sgemm_fn next_sgemm;
static pthread_once_t resolved = PTHREAD_ONCE_INIT;

static void resolve(void) {
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (next_sgemm == NULL) {
        /* Preloaded without a BLAS after it: there is nothing to forward to. */
        fprintf(stderr, "agentd gemv_forward: no cblas_sgemm after this library in LD_PRELOAD\n");
        abort();
    }
}

/* --- the kernels ---------------------------------------------------------------------------- */

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline vf load_part(const float *p, int n) {
    float t[VEC] = {0};
    memcpy(t, p, (size_t)n * sizeof(float));
    return load(t);
}

static inline void store_part(float *p, vf v, int n) {
    float t[VEC];
    memcpy(t, &v, sizeof v);
    memcpy(p, t, (size_t)n * sizeof(float));
}

/* Lane i plus lane i + VEC/2, then i + VEC/4, ...: one fixed order, whatever the tile. */
static inline float hsum(vf v) {
    typedef float v4 __attribute__((vector_size(16)));
#if VEC >= 8
    typedef float v8 __attribute__((vector_size(32)));
#endif
#if VEC == 16
    v8 lo8, hi8;
    memcpy(&lo8, &v, 32);
    memcpy(&hi8, (char *)&v + 32, 32);
    v8 s8 = lo8 + hi8;
#elif VEC == 8
    v8 s8 = v;
#endif
#if VEC >= 8
    v4 lo4, hi4;
    memcpy(&lo4, &s8, 16);
    memcpy(&hi4, (char *)&s8 + 16, 16);
    v4 s4 = lo4 + hi4;
#else
    v4 s4 = v;
#endif
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline float scaled(float sum, float alpha, float beta, const float *c) {
    /* beta == 0 must not read C: BLAS lets it hold anything, NaN included. */
    return beta == 0.0f ? alpha * sum : alpha * sum + beta * *c;
}

/* The problem after A is packed: A is m x kp, rows zero-padded from k to kp (a multiple of VEC). */
typedef struct {
    int m, n, k, kp;
    const float *a;
    const float *b;
    int ldb;
    float *c;
    int ldc;
    float alpha, beta;
} product;

/* GCC folds each load into every FMA that uses it (20 loads for 16 FMAs a step, the loads
 * then bound the tile); an empty asm that takes the vector in a register makes it load each
 * operand once (8 loads): 20-35% faster at 16-32 rows, same results. */
#if defined(__x86_64__) && defined(__AVX__) && defined(__GNUC__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) (void)0
#endif
/* One pass over each tile of B for up to 4 rows of A (tiles of 1, 2, 3 or 4 rows): a 3-row product
 * (a batched decode step of 3 agents) run as 2 + 1 read each tile twice, the second pass from L1
 * with the memory stream idle, and took longer than 4 rows. Kept out of line: inlined together into
 * their caller, GCC spilled the 4-row tile's accumulators and 4-16-row products ran 13-60% slower. */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif
/* B stored n x k (C = A B^T, MLX's x @ W.T): a tile is R rows of B by MM rows of A, R = 4 or 3.
 * Products of up to 8 rows (decode steps, batched ones) are bound by reading B and take 4 rows of
 * it a tile; from NT_3_ROWS_FROM rows they are bound by the FMAs and take 3: the 4 x 4 tile's 16
 * accumulators, 4 rows of B and a row of A need 21 of AVX2's 16 registers (GCC spilled 5
 * accumulators to the stack), 3 x 4 fits. The default model's products, 2 threads, weights from
 * memory, three interleaved rounds: 22 rows (a resumed turn's prefill) 10-25% faster, 16 rows
 * 5-20%, 8 rows even, 4 rows 3-10% slower. Each element of C is the same FMA sequence whatever R
 * is, so the results are the same bits. */
enum { NT_3_ROWS_FROM = 9 };
#define DEFINE_NT_TILE(R, MM)                                                                     \
    static NOINLINE void nt_tile_##R##_##MM(const float *a, int kp, const float *const *b, int k, \
                                            float sums[R][MM]) {                                  \
        vf acc[R][MM];                                                                            \
        _Pragma("GCC unroll 4") for (int x = 0; x < R; x++)                                       \
            _Pragma("GCC unroll 4") for (int y = 0; y < MM; y++) acc[x][y] = (vf){0};             \
        int full = k - k % VEC, p = 0;                                                            \
        for (; p < full; p += VEC) {                                                              \
            vf bv[R];                                                                             \
            _Pragma("GCC unroll 4") for (int x = 0; x < R; x++) {                                 \
                bv[x] = load(b[x] + p);                                                           \
                KEEP_IN_REGISTER(bv[x]);                                                          \
            }                                                                                     \
            _Pragma("GCC unroll 4") for (int y = 0; y < MM; y++) {                                \
                vf av = load(a + (size_t)y * kp + p);                                             \
                KEEP_IN_REGISTER(av);                                                             \
                _Pragma("GCC unroll 4") for (int x = 0; x < R; x++) acc[x][y] += bv[x] * av;      \
            }                                                                                     \
        }                                                                                         \
        if (p < k) {                                                                              \
            vf bv[R];                                                                             \
            _Pragma("GCC unroll 4") for (int x = 0; x < R; x++) bv[x] = load_part(b[x] + p, k - p); \
            _Pragma("GCC unroll 4") for (int y = 0; y < MM; y++) {                                \
                vf av = load(a + (size_t)y * kp + p);                                             \
                _Pragma("GCC unroll 4") for (int x = 0; x < R; x++) acc[x][y] += bv[x] * av;      \
            }                                                                                     \
        }                                                                                         \
        for (int x = 0; x < R; x++)                                                               \
            for (int y = 0; y < MM; y++) sums[x][y] = hsum(acc[x][y]);                            \
    }

/* Columns [j0, j1) of C (rows of B), R rows of B a tile. */
#define DEFINE_NT_COLUMNS(R)                                                                      \
    DEFINE_NT_TILE(R, 1)                                                                          \
    DEFINE_NT_TILE(R, 2)                                                                          \
    DEFINE_NT_TILE(R, 3)                                                                          \
    DEFINE_NT_TILE(R, 4)                                                                          \
    static void nt_columns_##R(const void *arg, int j0, int j1) {                                 \
        const product *pr = arg;                                                                  \
        for (int j = j0; j < j1; j += R) {                                                        \
            int r = j1 - j < R ? j1 - j : R;                                                      \
            const float *rows[R];                                                                 \
            /* A short tile repeats its first row: same code, results discarded. */               \
            for (int x = 0; x < R; x++) rows[x] = pr->b + (size_t)(j + (x < r ? x : 0)) * pr->ldb; \
            for (int i = 0; i < pr->m;) {                                                         \
                int mm = pr->m - i >= 4 ? 4 : pr->m - i;                                          \
                const float *a = pr->a + (size_t)i * pr->kp;                                      \
                float sums[R][4];                                                                 \
                if (mm == 4) {                                                                    \
                    nt_tile_##R##_4(a, pr->kp, rows, pr->k, sums);                                \
                } else if (mm == 3) {                                                             \
                    float s[R][3];                                                                \
                    nt_tile_##R##_3(a, pr->kp, rows, pr->k, s);                                   \
                    for (int x = 0; x < R; x++) sums[x][0] = s[x][0], sums[x][1] = s[x][1], sums[x][2] = s[x][2]; \
                } else if (mm == 2) {                                                             \
                    float s[R][2];                                                                \
                    nt_tile_##R##_2(a, pr->kp, rows, pr->k, s);                                   \
                    for (int x = 0; x < R; x++) sums[x][0] = s[x][0], sums[x][1] = s[x][1];       \
                } else {                                                                          \
                    float s[R][1];                                                                \
                    nt_tile_##R##_1(a, pr->kp, rows, pr->k, s);                                   \
                    for (int x = 0; x < R; x++) sums[x][0] = s[x][0];                             \
                }                                                                                 \
                for (int y = 0; y < mm; y++)                                                      \
                    for (int x = 0; x < r; x++) {                                                 \
                        float *cp = pr->c + (size_t)(i + y) * pr->ldc + j + x;                    \
                        *cp = scaled(sums[x][y], pr->alpha, pr->beta, cp);                        \
                    }                                                                             \
                i += mm;                                                                          \
            }                                                                                     \
        }                                                                                         \
    }
DEFINE_NT_COLUMNS(4)
DEFINE_NT_COLUMNS(3)

/* B stored k x n (C = A B): a tile is NN_V vectors of columns by MM rows of A; B is read row by
 * row, each element of C is one chain of fused multiply-adds over p in order. */
enum { NN_V = 4, NN_W = NN_V * VEC };
#define DEFINE_NN_TILE(MM)                                                                        \
    static NOINLINE void nn_tile_##MM(const float *a, int kp, const float *b, int ldb, int k,     \
                                      int width,                                                  \
                                      vf out[MM][NN_V]) {                                         \
        vf acc[MM][NN_V];                                                                         \
        _Pragma("GCC unroll 4") for (int y = 0; y < MM; y++)                                      \
            _Pragma("GCC unroll 4") for (int v = 0; v < NN_V; v++) acc[y][v] = (vf){0};           \
        if (width == NN_W) {                                                                      \
            for (int p = 0; p < k; p++) {                                                         \
                vf bv[NN_V];                                                                      \
                const float *row = b + (size_t)p * ldb;                                           \
                _Pragma("GCC unroll 4") for (int v = 0; v < NN_V; v++) bv[v] = load(row + v * VEC); \
                _Pragma("GCC unroll 4") for (int y = 0; y < MM; y++) {                            \
                    vf av = (vf){0} + a[(size_t)y * kp + p];                                      \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NN_V; v++) acc[y][v] += av * bv[v]; \
                }                                                                                 \
            }                                                                                     \
        } else {                                                                                  \
            for (int p = 0; p < k; p++) {                                                         \
                vf bv[NN_V];                                                                      \
                const float *row = b + (size_t)p * ldb;                                           \
                for (int v = 0; v < NN_V; v++) {                                                  \
                    int left = width - v * VEC;                                                   \
                    bv[v] = left >= VEC ? load(row + v * VEC)                                     \
                                        : left > 0 ? load_part(row + v * VEC, left) : (vf){0};    \
                }                                                                                 \
                _Pragma("GCC unroll 4") for (int y = 0; y < MM; y++) {                            \
                    vf av = (vf){0} + a[(size_t)y * kp + p];                                      \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NN_V; v++) acc[y][v] += av * bv[v]; \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        memcpy(out, acc, sizeof acc);                                                             \
    }
DEFINE_NN_TILE(1)
DEFINE_NN_TILE(2)
DEFINE_NN_TILE(3)
DEFINE_NN_TILE(4)

/* Column blocks [j0, j1) of C, each NN_W columns wide. */
static void nn_columns(const void *arg, int j0, int j1) {
    const product *pr = arg;
    for (int blk = j0; blk < j1; blk++) {
        int j = blk * NN_W;
        int width = pr->n - j < NN_W ? pr->n - j : NN_W;
        const float *b = pr->b + j;
        for (int i = 0; i < pr->m;) {
            int mm = pr->m - i >= 4 ? 4 : pr->m - i;
            const float *a = pr->a + (size_t)i * pr->kp;
            vf acc[4][NN_V];
            if (mm == 4)
                nn_tile_4(a, pr->kp, b, pr->ldb, pr->k, width, acc);
            else if (mm == 3)
                nn_tile_3(a, pr->kp, b, pr->ldb, pr->k, width, (vf(*)[NN_V])acc);
            else if (mm == 2)
                nn_tile_2(a, pr->kp, b, pr->ldb, pr->k, width, (vf(*)[NN_V])acc);
            else
                nn_tile_1(a, pr->kp, b, pr->ldb, pr->k, width, (vf(*)[NN_V])acc);
            for (int y = 0; y < mm; y++) {
                float *crow = pr->c + (size_t)(i + y) * pr->ldc + j;
                for (int v = 0; v < NN_V && v * VEC < width; v++) {
                    int left = width - v * VEC < VEC ? width - v * VEC : VEC;
                    vf r = acc[y][v] * pr->alpha;
                    if (pr->beta != 0.0f) r += (left == VEC ? load(crow + v * VEC)
                                                            : load_part(crow + v * VEC, left)) * pr->beta;
                    if (left == VEC)
                        memcpy(crow + v * VEC, &r, sizeof r);
                    else
                        store_part(crow + v * VEC, r, left);
                }
            }
            i += mm;
        }
    }
}

/* --- threads: the caller works too, helpers take chunks when they wake in time ---------------- */

typedef void (*chunk_fn)(const void *job, int from, int to);

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, idle;
    unsigned long generation; /* bumped per job; a helper joins each generation at most once */
    int open;                 /* helpers may still join the current job */
    int active;               /* helpers inside the current job */
    const void *pr;
    chunk_fn fn;
    int chunks, chunk_size, units;
    int next; /* next chunk to claim, under `lock` */
} pool_t;

static pool_t pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                      PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0, 0, 0, 0};
static int helpers; /* threads besides the caller; 0 = run everything on the caller */
static pthread_once_t pool_started = PTHREAD_ONCE_INIT;

static int claim(int *chunk) {
    int got = __atomic_fetch_add(&pool.next, 1, __ATOMIC_RELAXED);
    *chunk = got;
    return got < pool.chunks;
}

static void run_chunks(const void *pr, chunk_fn fn, int chunk_size, int units) {
    int chunk;
    while (claim(&chunk)) {
        int from = chunk * chunk_size;
        int to = from + chunk_size < units ? from + chunk_size : units;
        fn(pr, from, to);
    }
}

static void *helper_main(void *unused) {
    (void)unused;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (!(pool.open && pool.generation != seen)) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        pool.active++;
        const void *pr = pool.pr;
        chunk_fn fn = pool.fn;
        int chunk_size = pool.chunk_size, units = pool.units;
        pthread_mutex_unlock(&pool.lock);
        run_chunks(pr, fn, chunk_size, units);
        pthread_mutex_lock(&pool.lock);
        if (--pool.active == 0) pthread_cond_signal(&pool.idle);
    }
    return NULL;
}

static void start_pool(void) {
    /* The same setting as OpenBLAS's: agentd.blas sets it to the usable CPUs by default. */
    const char *env = getenv("OPENBLAS_NUM_THREADS");
    int threads = env ? atoi(env) : 1;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    for (int i = 0; i < threads - 1; i++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, helper_main, NULL) == 0) helpers++;
        pthread_attr_destroy(&attr);
    }
}

/* Run fn over [0, units) in chunks; the caller claims chunks itself, so a helper that is not
 * scheduled in time costs nothing but its share. Jobs are serialised (one pool). */
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;

static void parallel(const void *pr, chunk_fn fn, int units, int chunk_size, int split) {
    if (split) pthread_once(&pool_started, start_pool);
    if (!split || helpers == 0 || units <= chunk_size || pthread_mutex_trylock(&job_lock) != 0) {
        /* Small, single-threaded, or another thread's product holds the pool: run here. */
        fn(pr, 0, units);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    pool.pr = pr;
    pool.fn = fn;
    pool.chunk_size = chunk_size;
    pool.units = units;
    pool.chunks = (units + chunk_size - 1) / chunk_size;
    __atomic_store_n(&pool.next, 0, __ATOMIC_RELAXED);
    pool.generation++;
    pool.open = 1;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_chunks(pr, fn, chunk_size, units);

    /* Every chunk is claimed; close the job and wait for helpers still finishing theirs. */
    pthread_mutex_lock(&pool.lock);
    pool.open = 0;
    while (pool.active > 0) pthread_cond_wait(&pool.idle, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&job_lock);
}

/* --- the entry point ------------------------------------------------------------------------- */

static __thread float *packed;
static __thread size_t packed_cap;

static const float *pack_a(int m, int k, int kp, const float *a, int lda, int trans_a) {
    size_t need = (size_t)m * kp;
    if (need > packed_cap) {
        float *grown = realloc(packed, need * sizeof(float));
        if (grown == NULL) return NULL;
        packed = grown;
        packed_cap = need;
    }
    for (int i = 0; i < m; i++) {
        float *row = packed + (size_t)i * kp;
        if (trans_a == NO_TRANS)
            memcpy(row, a + (size_t)i * lda, (size_t)k * sizeof(float));
        else
            for (int p = 0; p < k; p++) row[p] = a[(size_t)p * lda + i];
        memset(row + k, 0, (size_t)(kp - k) * sizeof(float));
    }
    return packed;
}

static int transposed(int t) { return t == TRANS || t == CONJ_TRANS; }

static int max_rows = MAX_ROWS;

/* The most rows this file takes (the rest go to OpenBLAS); a value >= 0 sets it first, up to
 * 64. For benchmarks/few_rows.py, which compares the kernel with OpenBLAS in one process. */
int agentd_few_rows_max(int rows) {
    int previous = __atomic_load_n(&max_rows, __ATOMIC_RELAXED);
    if (rows >= 0) __atomic_store_n(&max_rows, rows < 64 ? rows : 64, __ATOMIC_RELAXED);
    return previous;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    pthread_once(&resolved, resolve);
    int kp = (k + VEC - 1) / VEC * VEC;
    /* alpha == 0 and k == 0 mean C = beta C without reading A or B: OpenBLAS's business. */
    int ours = order == ROW_MAJOR && m >= 1 && m <= __atomic_load_n(&max_rows, __ATOMIC_RELAXED) &&
               n >= 1 && k >= 1 &&
               alpha != 0.0f && (trans_a == NO_TRANS || transposed(trans_a)) &&
               (trans_b == NO_TRANS || transposed(trans_b)) && (size_t)m * kp <= MAX_PACKED;
    const float *a_packed = ours ? pack_a(m, k, kp, a, lda, trans_a) : NULL;
    if (a_packed == NULL) {
        next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    product pr = {m, n, k, kp, a_packed, b, ldb, c, ldc, alpha, beta};
    int split = (size_t)n * k >= SPLIT_MIN_B || (size_t)n * k * m >= SPLIT_MIN_WORK;
    if (transposed(trans_b) && m >= NT_3_ROWS_FROM) /* B is n x k: one unit is a row of B */
        parallel(&pr, nt_columns_3, n, 30, split);       /* chunks of whole 3-row tiles */
    else if (transposed(trans_b))
        parallel(&pr, nt_columns_4, n, 32, split);
    else /* B is k x n: one unit is a block of NN_W columns */
        parallel(&pr, nn_columns, (n + NN_W - 1) / NN_W, 1, split);
}

/* --- few-row attention ------------------------------------------------------------------------
 *
 * softmax(scale Q K^T + mask) V for queries of few rows: a decode step, a batched decode step, the
 * short prefill of a resumed turn. MLX's CPU backend computes it as a product, a softmax and a
 * product; its exp runs one element at a time (~13.5 ns each), and a 22-row prefill at 685 tokens
 * of context spent ~60 ms of ~200 in it. agentd.fewattn calls this through ctypes in place of
 * mlx-lm's scaled_dot_product_attention on the CPU (prefill chunks of more rows keep MLX's).
 *
 * Query rows are the lanes: a tile is AL rows of one KV head's group (GQA: the query heads that
 * share it, times the positions), Q transposed and scaled into AL-wide columns, so QK^T is
 * broadcast-multiply-adds of key elements without horizontal sums, the softmax is lane-wise (a
 * vectorised exp), and PV broadcasts each row's probability over V's rows. Each lane's results
 * are computed by the same operations in the same order whatever the other lanes hold and however
 * many rows there are (keys in blocks from position 0; a masked key's probability is exactly 0, so
 * keys a lane does not see add nothing), so a row is bit-identical to the same row computed alone:
 * the final chunk of a prompt gives the logits of a decode pass of its last id. */

#if VEC >= 8
#define AL 8 /* 8 lanes even with AVX-512: a decode step's 3 rows waste fewer of them */
#else
#define AL VEC
#endif
typedef float va __attribute__((vector_size(AL * 4)));
typedef int vi __attribute__((vector_size(AL * 4)));

enum { MASK_NONE = 0, MASK_CAUSAL = 1, MASK_BOOL = 2, MASK_ADD = 3 };
enum { KB = 8 };                  /* keys per pass over a tile's Q columns */
enum { ATTN_SPLIT_MIN = 1 << 18 }; /* multiply-adds below which one thread does the whole call */

typedef struct {
    int b, hq, hkv, lq, lk, d, dv, rep, tiles; /* tiles: per (batch, KV head) */
    const float *q, *k, *v;
    long long qs[3], ks[3], vs[3]; /* element strides of batch, head, position; the last axis is dense */
    float scale;
    int mask_kind;
    const void *mask;
    long long ms[4]; /* element strides of the mask over batch, query head, query, key */
    float *out;      /* b x lq x hq x dv */
} attn_job;

static inline va va_load(const float *p) {
    va v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline va va_select(vi take_a, va a, va b) { return (va)((take_a & (vi)a) | (~take_a & (vi)b)); }

/* exp, lane-wise (Cephes' expf: range reduction by ln 2 in two parts, a degree-6 polynomial, about
 * 1 ulp). Below -87.3 (exp is under FLT_MIN there) and at -inf it is exactly 0. */
static inline va va_exp(va x) {
    const va hi = (va){0} + 88.3762626647949f, lo = (va){0} - 87.3365447504019f;
    vi under = x < lo;
    x = va_select(x > hi, hi, x);
    x = va_select(under, lo, x);
    va fx = x * 1.44269504088896341f;
    /* round to nearest by the 1.5 * 2^23 trick (exact without -ffast-math, which is not used) */
    va n = (fx + 12582912.0f) - 12582912.0f;
    va r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    va p = (va){0} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    va y = p * (r * r) + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    y = y * (va)e;
    return (va)((vi)y & ~under);
}

static __thread float *attn_scratch;
static __thread size_t attn_scratch_cap;

static void attn_tile(const attn_job *jb, int b, int g, int t) {
    int d = jb->d, lk = jb->lk, rows = jb->rep * jb->lq;
    int head[AL], pos[AL], lim[AL], lanes = 0, nvis = 0;
    for (int l = 0; l < AL; l++) {
        int r = t * AL + l;
        if (r < rows) lanes = l + 1;
        else r = t * AL; /* a short tile repeats its first row: same code, results discarded */
        head[l] = g * jb->rep + r / jb->lq;
        pos[l] = r % jb->lq;
        int off = lk - jb->lq < 0 ? 0 : lk - jb->lq; /* as MLX's causal mask: queries end at the last key */
        lim[l] = jb->mask_kind == MASK_CAUSAL ? (off + pos[l] + 1 < lk ? off + pos[l] + 1 : lk) : lk;
        if (lim[l] > nvis) nvis = lim[l];
    }
    size_t need = (size_t)(d + nvis) * AL;
    if (need > attn_scratch_cap) {
        float *grown = realloc(attn_scratch, need * sizeof(float));
        if (grown == NULL) abort(); /* 32 bytes a key: a few hundred KiB at most in practice */
        attn_scratch = grown;
        attn_scratch_cap = need;
    }
    float *qt = attn_scratch, *s = attn_scratch + (size_t)d * AL;
    for (int l = 0; l < AL; l++) {
        const float *qr = jb->q + b * jb->qs[0] + head[l] * jb->qs[1] + pos[l] * jb->qs[2];
        for (int p = 0; p < d; p++) qt[(size_t)p * AL + l] = qr[p] * jb->scale;
    }
    const float *kb = jb->k + b * jb->ks[0] + g * jb->ks[1];
    /* S = (scale Q) K^T: each score one chain of multiply-adds over the head dimension, in order.
     * The last block repeats a key rather than run other code: GCC contracts a loop of its own into
     * fused multiply-adds differently, and a key's score would depend on where the block ends. */
    for (int j = 0; j < nvis; j += KB) {
        va acc[KB];
        const float *kr[KB];
        _Pragma("GCC unroll 8") for (int x = 0; x < KB; x++) {
            acc[x] = (va){0};
            kr[x] = kb + (j + x < nvis ? j + x : j) * jb->ks[2];
        }
        for (int p = 0; p < d; p++) {
            va qv = va_load(qt + (size_t)p * AL);
            _Pragma("GCC unroll 8") for (int x = 0; x < KB; x++) acc[x] += qv * kr[x][p];
        }
        for (int x = 0; x < KB && j + x < nvis; x++) memcpy(s + (size_t)(j + x) * AL, &acc[x], sizeof(va));
    }
    /* The mask, then the softmax along the keys, lane by lane. */
    va ninf = (va){0} - __builtin_inff();
    vi limv;
    memcpy(&limv, lim, sizeof limv);
    va mx = ninf;
    int j;
    for (j = 0; j < nvis; j++) {
        va sj = va_load(s + (size_t)j * AL);
        if (jb->mask_kind == MASK_CAUSAL || jb->mask_kind == MASK_NONE) {
            sj = va_select((vi){0} + j >= limv, ninf, sj);
        } else {
            float m[AL];
            for (int l = 0; l < AL; l++) {
                long long at = b * jb->ms[0] + head[l] * jb->ms[1] + pos[l] * jb->ms[2] + j * jb->ms[3];
                if (jb->mask_kind == MASK_BOOL)
                    m[l] = ((const unsigned char *)jb->mask)[at] ? 0.0f : -__builtin_inff();
                else
                    m[l] = ((const float *)jb->mask)[at];
            }
            sj += va_load(m);
        }
        mx = va_select(sj > mx, sj, mx);
        memcpy(s + (size_t)j * AL, &sj, sizeof sj);
    }
    va sum = (va){0};
    for (j = 0; j < nvis; j++) {
        va e = va_exp(va_load(s + (size_t)j * AL) - mx);
        sum += e;
        memcpy(s + (size_t)j * AL, &e, sizeof e);
    }
    va inv = 1.0f / sum;
    for (j = 0; j < nvis; j++) {
        va e = va_load(s + (size_t)j * AL) * inv;
        memcpy(s + (size_t)j * AL, &e, sizeof e);
    }
    /* O = P V: two rows at a time by up to 8 vectors of V's columns, each element one chain over
     * the keys in order. */
    const float *vb = jb->v + b * jb->vs[0] + g * jb->vs[1];
    enum { PV_W = 8 * AL };
    for (int l0 = 0; l0 < lanes; l0 += 2) {
        int l1 = l0 + 1 < lanes ? l0 + 1 : l0;
        for (int c0 = 0; c0 < jb->dv; c0 += PV_W) {
            int width = jb->dv - c0 < PV_W ? jb->dv - c0 : PV_W;
            int nv = (width + AL - 1) / AL;
            va acc0[8], acc1[8];
            _Pragma("GCC unroll 8") for (int x = 0; x < 8; x++) acc0[x] = acc1[x] = (va){0};
            if (width == PV_W) {
                for (j = 0; j < nvis; j++) {
                    const float *vr = vb + j * jb->vs[2] + c0;
                    float p0 = s[(size_t)j * AL + l0], p1 = s[(size_t)j * AL + l1];
                    _Pragma("GCC unroll 8") for (int x = 0; x < 8; x++) {
                        va vv = va_load(vr + x * AL);
                        acc0[x] += p0 * vv;
                        acc1[x] += p1 * vv;
                    }
                }
            } else {
                for (j = 0; j < nvis; j++) {
                    const float *vr = vb + j * jb->vs[2] + c0;
                    float p0 = s[(size_t)j * AL + l0], p1 = s[(size_t)j * AL + l1];
                    for (int x = 0; x < nv; x++) {
                        va vv;
                        int left = width - x * AL;
                        if (left >= AL) {
                            vv = va_load(vr + x * AL);
                        } else {
                            float tmp[AL] = {0};
                            memcpy(tmp, vr + x * AL, (size_t)left * sizeof(float));
                            vv = va_load(tmp);
                        }
                        acc0[x] += p0 * vv;
                        acc1[x] += p1 * vv;
                    }
                }
            }
            for (int y = 0; y < 2 && l0 + y < lanes; y++) {
                int l = l0 + y;
                float *o = jb->out + (((size_t)b * jb->lq + pos[l]) * jb->hq + head[l]) * jb->dv + c0;
                va *acc = y ? acc1 : acc0;
                for (int x = 0; x < nv; x++) {
                    int left = width - x * AL < AL ? width - x * AL : AL;
                    memcpy(o + x * AL, &acc[x], (size_t)left * sizeof(float));
                }
            }
        }
    }
}

static void attn_units(const void *arg, int u0, int u1) {
    const attn_job *jb = arg;
    for (int u = u0; u < u1; u++) {
        int t = u % jb->tiles, bg = u / jb->tiles;
        attn_tile(jb, bg / jb->hkv, bg % jb->hkv, t);
    }
}

/* Attention for B x Hq x Lq queries over B x Hkv x Lk keys and values (Hq a multiple of Hkv),
 * float32, each tensor's last axis dense and the other strides (in elements) given for batch, head
 * and position; mask_kind MASK_NONE, MASK_CAUSAL (query i sees keys up to Lk - Lq + i, as MLX's
 * "causal"), MASK_BOOL (bytes, true = attend) or MASK_ADD (floats added to the scores), with mask
 * strides over batch, query head, query and key (0 to broadcast). Writes out as B x Lq x Hq x Dv.
 * Returns 0, or -1 for shapes it does not take (the caller then uses MLX's attention). */
int agentd_attention(int b, int hq, int hkv, int lq, int lk, int d, int dv, const float *q,
                     const long long *qs, const float *k, const long long *ks, const float *v,
                     const long long *vs, float scale, int mask_kind, const void *mask,
                     const long long *ms, float *out) {
    if (b < 1 || hkv < 1 || hq < hkv || hq % hkv || lq < 1 || lk < 1 || d < 1 || dv < 1 ||
        mask_kind < MASK_NONE || mask_kind > MASK_ADD || (mask_kind >= MASK_BOOL && mask == NULL))
        return -1;
    attn_job jb = {b, hq, hkv, lq, lk, d, dv, hq / hkv, (hq / hkv * lq + AL - 1) / AL,
                   q, k, v, {qs[0], qs[1], qs[2]}, {ks[0], ks[1], ks[2]}, {vs[0], vs[1], vs[2]},
                   scale, mask_kind, mask, {0, 0, 0, 0}, out};
    if (mask_kind >= MASK_BOOL)
        for (int i = 0; i < 4; i++) jb.ms[i] = ms[i];
    int units = b * hkv * jb.tiles;
    int split = (double)b * hq * lq * lk * (d + dv) >= ATTN_SPLIT_MIN;
    parallel(&jb, attn_units, units, 1, split);
    return 0;
}

/* --- SwiGLU: silu(gate) * up ------------------------------------------------------------------
 *
 * The MLP's activation, whose exp MLX's CPU backend also runs one element at a time: 0.75 ms a
 * layer for 22 rows of the default model's 1,536-wide MLP (30 layers: ~20 ms of a ~140 ms pass).
 * agentd.fewattn calls this for calls of a few rows. Computed as MLX writes it, gate *
 * (1 / (1 + exp(-gate))) * up, each element by the same vector code (the tail through a padded
 * copy), so an element does not depend on where it falls. */
static inline va swiglu_va(va g, va u) { return g * (1.0f / (1.0f + va_exp(-g))) * u; }

typedef struct {
    const float *gate, *up;
    float *out;
    long long n;
} swiglu_job;
enum { SWIGLU_UNIT = 1024 }; /* elements a thread claims at a time (a multiple of AL) */

static void swiglu_part(const void *arg, int from, int to) {
    const swiglu_job *jb = arg;
    long long lo = (long long)from * SWIGLU_UNIT, hi = (long long)to * SWIGLU_UNIT;
    if (hi > jb->n) hi = jb->n;
    long long i = lo;
    for (; i + AL <= hi; i += AL) {
        va r = swiglu_va(va_load(jb->gate + i), va_load(jb->up + i));
        memcpy(jb->out + i, &r, sizeof r);
    }
    if (i < hi) {
        float g[AL] = {0}, u[AL] = {0}, o[AL];
        memcpy(g, jb->gate + i, (size_t)(hi - i) * sizeof(float));
        memcpy(u, jb->up + i, (size_t)(hi - i) * sizeof(float));
        va r = swiglu_va(va_load(g), va_load(u));
        memcpy(o, &r, sizeof r);
        memcpy(jb->out + i, o, (size_t)(hi - i) * sizeof(float));
    }
}

/* out[i] = silu(gate[i]) * up[i] for n dense float32 elements. */
void agentd_swiglu(long long n, const float *gate, const float *up, float *out) {
    if (n <= 0) return;
    swiglu_job jb = {gate, up, out, n};
    parallel(&jb, swiglu_part, (int)((n + SWIGLU_UNIT - 1) / SWIGLU_UNIT), 8, n >= 1 << 15);
}
