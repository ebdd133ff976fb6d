/* Forward one-row cblas_sgemm calls to cblas_sgemv.
 *
 * MLX's CPU backend issues every float32 product as cblas_sgemm, including the one-row
 * products of a decode step (x @ W.T with x of shape 1 x K). OpenBLAS 0.3.21 (Debian 12)
 * runs those as a general GEMM, about 3.5x slower than the GEMV it is: 250 vs 73 us for a
 * 1 x 576 by 576 x 3072 product. agentd.blas preloads this library in front of a system
 * OpenBLAS (LD_PRELOAD=this:libopenblas.so.0); MLX's dynamic lookup of cblas_sgemm then
 * lands here, and every call that is not a row-major one-row product goes on to the next
 * definition, OpenBLAS's, unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a,
                         int lda, const float *x, int incx, float beta, float *y, int incy);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;
static pthread_once_t resolved = PTHREAD_ONCE_INIT;

static void resolve(void) {
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    if (next_sgemm == NULL || next_sgemv == NULL) {
        /* Preloaded without a BLAS after it: there is nothing to forward to. */
        fprintf(stderr, "agentd gemv_forward: no cblas_sgemm/cblas_sgemv after this library "
                        "in LD_PRELOAD\n");
        abort();
    }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    pthread_once(&resolved, resolve);
    if (order == ROW_MAJOR && m == 1 && n > 1 && k > 0) {
        /* C (1 x n) = alpha * op(A) (1 x k) * op(B) (k x n) + beta * C, i.e. the vector
         * c = alpha * op(B)^T a + beta * c. A row of A is contiguous; a transposed A holds
         * its k values one column apart, lda floats each. */
        int inc_a = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS) /* B is k x n: c = B^T a */
            next_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
        else /* B is stored n x k: c = B a */
            next_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
        return;
    }
    next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
