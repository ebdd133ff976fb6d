/* A restore's read and checksum in one pass: file bytes into their final memory, hashed
 * while they are still in the CPU's cache.
 *
 * agentd_read_hash reads a run of a file into a list of buffers (a segment's rows, in
 * storage order) with preadv, RUN bytes at a time, and feeds each run to xxh3-128 right after
 * it lands: the hash reads it from L2 instead of memory, and no Python runs between the reads.
 * The xxh3 functions are the `xxhash` package's own (bound by agentd_hash_bind from its
 * extension module), so the digest is by construction the one the files were written with.
 * agentd.readhash builds and binds this; ctypes drops the GIL around each call, so the read
 * threads run it side by side.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct { unsigned long long low64, high64; } agentd_h128; /* XXH128_hash_t */
typedef void *(*create_fn)(void);
typedef int (*free_fn)(void *);
typedef int (*reset_fn)(void *);
typedef int (*update_fn)(void *, const void *, size_t);
typedef agentd_h128 (*digest_fn)(const void *);

static create_fn xxh_create;
static free_fn xxh_free;
static reset_fn xxh_reset;
static update_fn xxh_update;
static digest_fn xxh_digest;

enum { BATCH_IOVS = 64 };

void agentd_hash_bind(void *create, void *free, void *reset, void *update, void *digest) {
    xxh_create = (create_fn)create;
    xxh_free = (free_fn)free;
    xxh_reset = (reset_fn)reset;
    xxh_update = (update_fn)update;
    xxh_digest = (digest_fn)digest;
}

/* A new xxh3-128 state that has hashed `prefix`; NULL when no hash is bound or no memory. */
void *agentd_hash_new(const void *prefix, size_t prefix_len) {
    if (!xxh_create)
        return NULL;
    void *state = xxh_create();
    if (!state)
        return NULL;
    xxh_reset(state);
    if (prefix_len)
        xxh_update(state, prefix, prefix_len);
    return state;
}

/* The digest of everything `state` hashed, into `out` (low64, high64); frees the state. */
void agentd_hash_finish(void *state, unsigned long long *out) {
    agentd_h128 h = xxh_digest(state);
    out[0] = h.low64;
    out[1] = h.high64;
    xxh_free(state);
}

/* Frees a state without a digest (a read that failed). */
void agentd_hash_drop(void *state) { xxh_free(state); }

/* Fill the `n` buffers `iov` from `fd` at `offset`, in order, and hash every byte read into
 * `state`, `run` bytes read and hashed at a time. Returns 0 when every buffer is full, 1 when
 * the file ends first, 2 when a read fails (`*err` = errno). */
int agentd_read_hash(int fd, const struct iovec *iov, int n, long long offset, void *state, size_t run,
                     int *err) {
    if (run == 0)
        run = 1;
    int at = 0; /* the next byte to fill: iov[at], `into` bytes in */
    size_t into = 0;
    long long pos = offset;
    for (;;) {
        while (at < n && into == iov[at].iov_len) {
            at++;
            into = 0;
        }
        if (at == n)
            return 0;
        struct iovec batch[BATCH_IOVS];
        int nb = 0;
        size_t want = 0;
        for (int j = at; j < n && nb < BATCH_IOVS && want < run; j++) {
            size_t skip = j == at ? into : 0;
            size_t len = iov[j].iov_len - skip;
            if (len > run - want)
                len = run - want;
            if (len == 0)
                continue;
            batch[nb].iov_base = (char *)iov[j].iov_base + skip;
            batch[nb].iov_len = len;
            nb++;
            want += len;
        }
        ssize_t got = preadv(fd, batch, nb, pos);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return 2;
        }
        if (got == 0)
            return 1;
        pos += got;
        size_t left = (size_t)got;
        for (int b = 0; b < nb && left; b++) {
            size_t k = batch[b].iov_len < left ? batch[b].iov_len : left;
            xxh_update(state, batch[b].iov_base, k);
            left -= k;
        }
        left = (size_t)got; /* advance past what was read (a short read resumes mid-buffer) */
        while (left) {
            size_t avail = iov[at].iov_len - into;
            if (avail <= left) {
                left -= avail;
                at++;
                into = 0;
            } else {
                into += left;
                left = 0;
            }
        }
    }
}

/* Ask for transparent huge pages over the 2 MiB-aligned part of [addr, addr + len): memory not
 * yet touched then faults in 2 MiB at a time, not 4 KiB (Linux with THP in `madvise` mode; a
 * no-op elsewhere and for pages already there). Returns madvise's result, or 0. */
int agentd_advise_huge(void *addr, size_t len) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)addr + huge - 1) & ~(huge - 1), hi = ((uintptr_t)addr + len) & ~(huge - 1);
    if (hi > lo)
        return madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#endif
    (void)addr;
    (void)len;
    return 0;
}
