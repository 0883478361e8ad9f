/*
 * shmcast.broker._core: the seqlock, the wake and the bulk copies of a segment,
 * and whether its name still leads to it (Ring.same_object).
 *
 * The compiled core of the engine (broker/_segment.py keeps the API, the
 * docstrings and the errors; this module is private). Written against the
 * CPython limited API of 3.10 (one abi3 build serves 3.10 and later) and C11
 * <stdatomic.h>; Linux only (futex). Nothing here is specific to one CPU: the
 * orderings are C11's, the syscall numbers come from <sys/syscall.h>.
 *
 * Which word is stored or loaded with which ordering, and what it pairs with
 * (byte offsets are layout 2's, see broker/_layout.py):
 *
 *   writer, begin          seq[i]     relaxed store of s+1 (odd), then a release
 *                                     FENCE: the odd value is ordered before every
 *                                     store into the slot that follows (the copy or
 *                                     the caller's loan). Pairs with the reader's
 *                                     acquire fence in validate (the kernel's
 *                                     write_seqcount_begin: seq++, smp_wmb()).
 *   writer, commit         version, commit times of slot i: relaxed stores (inside
 *                                     the critical section, covered by seq)
 *                          seq[i]     RELEASE store of s+2 (even): the slot's bytes
 *                                     and control words are visible to whoever
 *                                     acquires this value (write_seqcount_end).
 *                          latest slot (byte 256) RELEASE store, then
 *                          latest (byte 64)       RELEASE store: a reader that
 *                                     acquires latest = v finds v's slot complete.
 *                          waiters (byte 100)     EXCHANGE with 0, seq_cst: did
 *                                     anyone announce a sleep since the last commit?
 *                          notify (byte 96)       RELEASE store of notify + 1
 *                                     (one writer: a plain increment), after the
 *                                     exchange; FUTEX_WAKE only if the exchange
 *                                     returned non-zero. A commit nobody waits for
 *                                     makes no syscall.
 *   reader, acquire        latest, latest slot, seq[i], version: ACQUIRE loads, in
 *                                     that order; the view's loads come after them.
 *   reader, validate       an acquire FENCE, then a relaxed load of seq[i]: every
 *                                     load of the view is ordered before the second
 *                                     look at seq (read_seqcount_retry's smp_rmb();
 *                                     CPython's fix for arm64, python/cpython#121388,
 *                                     added exactly this fence and the writer's).
 *   waiter, before a sleep waiters    atomic OR of 1 (seq_cst RMW), then
 *                          notify     ACQUIRE load (the value FUTEX_WAIT compares),
 *                          latest     ACQUIRE load (done if newer than `after`),
 *                          waiters    ACQUIRE load again: if a commit cleared it in
 *                                     between, announce again before sleeping.
 *
 * Why no wake-up is lost (the classic "waiters flag" futex pattern): the
 * waiter's OR and the committer's exchange are read-modify-writes of one word,
 * so one comes first. If the OR does, the exchange returns non-zero and the
 * committer wakes after bumping notify; the waiter's notify value was loaded
 * before that bump (had it acquired the bump it would have seen the new latest
 * and not slept), so FUTEX_WAIT either finds the word changed or is queued before
 * the wake. If the exchange comes first, the OR reads from it (release, then
 * acquire), so the waiter's load of latest sees the new version and it does not
 * sleep. The second load of the flag covers a flag cleared by an earlier commit
 * between the waiter's OR and its sleep: the waiter announces itself again. A
 * waiter killed while asleep leaves the flag set: the next commit makes one
 * needless wake and clears it.
 *
 * Readers map the segment read-only; a reader that sleeps maps the object's
 * first page a second time, writable, here, for the waiters word only (never
 * handed to Python). The atomics must be lock-free (hence address-free, C11
 * 7.17.5): they are shared between processes.
 */
#define _GNU_SOURCE 1
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#if !defined(__linux__)
#error "shmcast's core needs Linux (futex)"
#endif
#if ATOMIC_LLONG_LOCK_FREE != 2 || ATOMIC_INT_LOCK_FREE != 2
#error "shmcast's core needs lock-free 32- and 64-bit atomics (they are shared between processes)"
#endif

typedef _Atomic uint64_t au64;
typedef _Atomic uint32_t au32;
_Static_assert(sizeof(au64) == 8 && sizeof(au32) == 4, "atomic words must keep their size");

#define RLX memory_order_relaxed
#define ACQ memory_order_acquire
#define REL memory_order_release
#define SEQ memory_order_seq_cst

/* ---- layout 2 (broker/_layout.py; tests/test_core.py checks they agree) ---- */
#define LAYOUT_VERSION 2
#define W_LATEST 8
#define W_HEARTBEAT 11
#define W_LATEST_SLOT 32
#define NOTIFY_OFF 96
#define WAITERS_OFF 100
#define SLOT_CTL 2048
#define SLOT_CTL_SIZE 64
#define S_SEQ 0
#define S_VERSION 1
#define S_WALL 2
#define S_MONO 3
#define MAX_SLOTS 64
#define MAX_VERSION ((uint64_t)INT64_MAX)
#define PAGE 4096

/* Looks at an inconsistent header before a reader reports a stuck slot: at least
 * MAX_LOOKS of them and STUCK_NS of time (a writer preempted mid-commit is not
 * stuck); after YIELD_AFTER looks the reader yields the CPU between looks. */
#define MAX_LOOKS 1000
#define YIELD_AFTER 64
#define STUCK_NS 20000000LL
/* A busy-poll checks the clock every SPIN_CHECK turns and signals every SIGNAL_NS. */
#define SPIN_CHECK 1024
#define SIGNAL_NS 20000000LL
#define WAITV_MAX 128

#ifndef SYS_futex_waitv
#if defined(__x86_64__) || defined(__aarch64__)
#define SYS_futex_waitv 449
#endif
#endif
#define SHM_FUTEX_WAIT_BITSET 9
#define SHM_FUTEX_WAKE 1
#define SHM_FUTEX_PRIVATE 128
#define SHM_FUTEX2_SIZE_U32 0x02
#define SHM_FUTEX2_PRIVATE 128
#define SHM_BITSET_ANY 0xffffffffu

struct shm_waitv { /* struct futex_waitv of <linux/futex.h> (5.16+), spelt out */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    atomic_signal_fence(SEQ);
#endif
}

static inline int64_t clock_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static inline int64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* Busy-wait up to max_ns nanoseconds, a random share of it (the stress tests' way
 * to widen the race windows and shuffle the interleavings; *rng is xorshift64). */
static void stall(int64_t max_ns, uint64_t *rng) {
    if (max_ns <= 0)
        return;
    uint64_t x = *rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *rng = x;
    int64_t until = mono_ns() + (int64_t)(x % (uint64_t)max_ns);
    while (mono_ns() < until)
        cpu_relax();
}

static inline struct timespec to_timespec(int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    return ts;
}

/* ------------------------------------------------------------------ futex */

static int waitv_state = 0; /* 0 unknown, 1 works, -1 ENOSYS */

/* Sleep while *word == expected, until deadline_ns (CLOCK_MONOTONIC, <0: none).
 * Shared (not private): the word lives in a shared mapping. Returns errno or 0. */
static int futex_wait_abs(au32 *word, uint32_t expected, int64_t deadline_ns) {
    struct timespec ts, *tsp = NULL;
    if (deadline_ns >= 0) {
        ts = to_timespec(deadline_ns);
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, (uint32_t *)word, SHM_FUTEX_WAIT_BITSET, expected, tsp, NULL,
                      SHM_BITSET_ANY);
    return rc < 0 ? errno : 0;
}

static long futex_wake_all(au32 *word, int private_) {
    return syscall(SYS_futex, (uint32_t *)word, SHM_FUTEX_WAKE | (private_ ? SHM_FUTEX_PRIVATE : 0),
                   INT_MAX, NULL, NULL, 0);
}

/* futex_waitv on n <= WAITV_MAX words; returns errno or 0 (ENOSYS: not this kernel). */
static int futex_waitv_abs(struct shm_waitv *v, unsigned n, int64_t deadline_ns) {
#ifdef SYS_futex_waitv
    if (waitv_state >= 0) {
        struct timespec ts, *tsp = NULL;
        if (deadline_ns >= 0) {
            ts = to_timespec(deadline_ns);
            tsp = &ts;
        }
        long rc = syscall(SYS_futex_waitv, v, n, 0, tsp, CLOCK_MONOTONIC);
        if (rc >= 0) {
            waitv_state = 1;
            return 0;
        }
        if (errno != ENOSYS)
            return errno;
        waitv_state = -1;
    }
#else
    (void)v;
    (void)n;
    (void)deadline_ns;
#endif
    return ENOSYS;
}

/* ------------------------------------------------------------------ the ring */

typedef struct {
    PyObject_HEAD
    PyObject *owner;   /* keeps the mapping alive (a buffer export of it) */
    char *base;        /* the mapping, page aligned */
    au64 *hdr;         /* the header as u64 words */
    au32 *notify;      /* byte 96 */
    au32 *flag;        /* byte 100: through the writer's mapping or the reader's page */
    void *flag_page;   /* a reader's writable mapping of page 0 (ours to unmap) */
    uint64_t slots, header_size, stride, nbytes;
    int writable;
    int always_wake;   /* the writer wakes at every commit (others may read the object) */
    int64_t poll_ns;   /* a reader that cannot announce itself sleeps at most this long */
    int64_t stall_ns;  /* tests only: widen the windows between the protocol's steps */
    uint64_t rng;
    uint64_t commits, wakes;
    uint64_t obj_dev, obj_ino; /* the mapped object's identity, once same_object took it */
    int obj_known;
} Ring;

typedef struct {
    uint64_t version, slot, seq, wall, mono;
} Look;

static PyObject *RingType = NULL;

static inline au64 *ctl(Ring *r, uint64_t i) {
    return (au64 *)(r->base + SLOT_CTL + SLOT_CTL_SIZE * i);
}
static inline char *slot_data(Ring *r, uint64_t i) {
    return r->base + r->header_size + r->stride * i;
}

static int ring_closed_check(Ring *r) {
    if (r->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring is not set up");
        return -1;
    }
    return 0;
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *owner, *addr;
    unsigned long long slots, hsize, stride, nbytes;
    int writable, always_wake;
    if (kwds != NULL && PyDict_Size(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "Ring takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOKKKKpp", &owner, &addr, &slots, &hsize, &stride, &nbytes,
                          &writable, &always_wake))
        return NULL;
    void *base = PyLong_AsVoidPtr(addr);
    if (base == NULL && PyErr_Occurred())
        return NULL;
    /* The mapping's length (owner is a buffer export of it, one byte per item): the
     * layout must fit in it, or every copy below would run past its end. */
    Py_ssize_t size = PyObject_Size(owner);
    if (size < 0)
        return NULL;
    if (base == NULL || ((uintptr_t)base % PAGE) != 0 || slots < 2 || slots > MAX_SLOTS ||
        hsize < SLOT_CTL + SLOT_CTL_SIZE * slots || hsize % PAGE != 0 || stride < nbytes ||
        nbytes == 0 || hsize > (unsigned long long)size ||
        stride > ((unsigned long long)size - hsize) / slots) {
        PyErr_SetString(PyExc_ValueError, "Ring: impossible mapping or layout");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Ring *r = (Ring *)alloc(type, 0);
    if (r == NULL)
        return NULL;
    Py_INCREF(owner);
    r->owner = owner;
    r->base = (char *)base;
    r->hdr = (au64 *)base;
    r->notify = (au32 *)(r->base + NOTIFY_OFF);
    r->flag = writable ? (au32 *)(r->base + WAITERS_OFF) : NULL;
    r->flag_page = NULL;
    r->slots = slots;
    r->header_size = hsize;
    r->stride = stride;
    r->nbytes = nbytes;
    r->writable = writable;
    r->always_wake = always_wake;
    r->poll_ns = 0;
    r->stall_ns = 0;
    r->rng = (uint64_t)mono_ns() | 1;
    r->commits = r->wakes = 0;
    r->obj_dev = r->obj_ino = 0;
    r->obj_known = 0;
    return (PyObject *)r;
}

static void Ring_dealloc(PyObject *self) {
    Ring *r = (Ring *)self;
    PyTypeObject *tp = Py_TYPE(self);
    if (r->flag_page != NULL)
        munmap(r->flag_page, PAGE);
    r->flag_page = NULL;
    r->base = NULL;
    Py_CLEAR(r->owner);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

/* ---- argument helpers (METH_FASTCALL) ---- */

static int arg_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int arg_slot(Ring *r, PyObject *o, uint64_t *out) {
    if (arg_u64(o, out) < 0)
        return -1;
    if (*out >= r->slots) {
        PyErr_SetString(PyExc_IndexError, "slot out of range");
        return -1;
    }
    return 0;
}

/* A timeout in seconds (None: for ever) as an absolute CLOCK_MONOTONIC deadline. */
static int arg_deadline(PyObject *o, int64_t *deadline_ns) {
    if (o == Py_None) {
        *deadline_ns = -1;
        return 0;
    }
    double t = PyFloat_AsDouble(o);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (!(t > 0)) /* also NaN */
        t = 0;
    if (t > 1e9)
        t = 1e9;
    *deadline_ns = mono_ns() + (int64_t)(t * 1e9);
    return 0;
}

static int nargs_ok(Py_ssize_t n, Py_ssize_t want, const char *name) {
    if (n != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, n);
        return 0;
    }
    return 1;
}

static PyObject *look_tuple(const Look *k, int with_mono) {
    PyObject *t = PyTuple_New(with_mono ? 5 : 4);
    if (t == NULL)
        return NULL;
    uint64_t vals[5] = {k->version, k->slot, k->seq, k->wall, k->mono};
    for (int j = 0; j < (with_mono ? 5 : 4); j++) {
        PyObject *n = PyLong_FromUnsignedLongLong(vals[j]);
        if (n == NULL || PyTuple_SetItem(t, j, n) < 0) {
            Py_DECREF(t);
            return NULL;
        }
    }
    return t;
}

/* ---- the reader's looks ---- */

static inline int try_slot(Ring *r, uint64_t i, uint64_t v, Look *out) {
    au64 *c = ctl(r, i);
    uint64_t s = atomic_load_explicit(&c[S_SEQ], ACQ);
    if (s & 1)
        return 0;
    if (atomic_load_explicit(&c[S_VERSION], ACQ) != v)
        return 0;
    out->version = v;
    out->slot = i;
    out->seq = s;
    out->wall = atomic_load_explicit(&c[S_WALL], RLX);
    out->mono = atomic_load_explicit(&c[S_MONO], RLX);
    return 1;
}

/* The latest version's slot. 1: found; 0: nothing published; -2: stuck. The slot
 * of `latest` is never written (a write takes the one after it), so a reader that
 * does not find it was lapped by the writer and looks at the newer latest; a
 * writer preempted between its latest-slot and latest stores leaves the old
 * version's slot whole, found by the scan. Called with the GIL held; it is
 * released only to yield the CPU after many inconsistent looks. */
static int look_latest(Ring *r, Look *out) {
    int64_t t0 = 0;
    for (int looks = 0;; looks++) {
        uint64_t v = atomic_load_explicit(&r->hdr[W_LATEST], ACQ);
        if (v == 0)
            return 0;
        uint64_t hint = atomic_load_explicit(&r->hdr[W_LATEST_SLOT], ACQ);
        if (hint < r->slots && try_slot(r, hint, v, out))
            return 1;
        for (uint64_t i = 0; i < r->slots; i++)
            if (i != hint && try_slot(r, i, v, out))
                return 1;
        if (looks == 0)
            t0 = mono_ns();
        else if (looks >= MAX_LOOKS && mono_ns() - t0 >= STUCK_NS) {
            out->version = v;
            return -2;
        }
        if (looks >= YIELD_AFTER) {
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
        } else {
            cpu_relax();
        }
    }
}

static PyObject *look_result(Ring *r, int rc, const Look *k, int with_mono) {
    (void)r;
    if (rc == 1)
        return look_tuple(k, with_mono);
    return PyLong_FromLongLong(rc == 0 ? 0 : -(long long)k->version - 1);
}

/* ---- methods ---- */

static PyObject *Ring_latest(PyObject *self, PyObject *unused) {
    (void)unused;
    Ring *r = (Ring *)self;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&r->hdr[W_LATEST], ACQ));
}

/* The write protocol's two halves, shared by begin/commit and write_from. */

/* Take the slot after the latest's for version (0: latest + 1) and make its seq odd.
 * 0 when version is not newer than the latest or beyond MAX_VERSION. */
static int ring_begin(Ring *r, uint64_t version, uint64_t *v_out, uint64_t *i_out,
                      uint64_t *s_out) {
    uint64_t latest = atomic_load_explicit(&r->hdr[W_LATEST], ACQ);
    uint64_t v = version ? version : latest + 1;
    if (v <= latest || v > MAX_VERSION)
        return 0;
    uint64_t i = (atomic_load_explicit(&r->hdr[W_LATEST_SLOT], ACQ) % r->slots + 1) % r->slots;
    au64 *c = ctl(r, i);
    uint64_t s = atomic_load_explicit(&c[S_SEQ], RLX);
    if (s & 1) /* a writer died in the middle of this slot: step past its odd value */
        s += 1;
    atomic_store_explicit(&c[S_SEQ], s + 1, RLX);
    /* The odd seq before any byte of the slot (write_seqcount_begin's smp_wmb). */
    atomic_thread_fence(REL);
    *v_out = v;
    *i_out = i;
    *s_out = s;
    return 1;
}

/* Publish slot i as version v (seq s + 2), then wake sleepers if any announced
 * themselves. Returns 1 when it made the wake syscall. */
static int ring_commit(Ring *r, uint64_t v, uint64_t i, uint64_t s, uint64_t wall) {
    au64 *c = ctl(r, i);
    int64_t mono = mono_ns();
    atomic_store_explicit(&c[S_VERSION], v, RLX);
    atomic_store_explicit(&c[S_WALL], wall ? wall : (uint64_t)clock_ns(CLOCK_REALTIME), RLX);
    atomic_store_explicit(&c[S_MONO], (uint64_t)mono, RLX);
    atomic_store_explicit(&c[S_SEQ], s + 2, REL); /* even: the slot is whole */
    /* Latest slot before latest: whoever acquires latest = v finds v's slot. */
    atomic_store_explicit(&r->hdr[W_LATEST_SLOT], i, REL);
    atomic_store_explicit(&r->hdr[W_LATEST], v, REL);
    atomic_store_explicit(&r->hdr[W_HEARTBEAT], (uint64_t)mono, RLX);
    stall(r->stall_ns, &r->rng);
    uint32_t asleep = atomic_exchange_explicit(r->flag, 0, SEQ);
    stall(r->stall_ns, &r->rng);
    uint32_t n = atomic_load_explicit(r->notify, RLX);
    atomic_store_explicit(r->notify, n + 1, REL);
    r->commits++;
    if (asleep || r->always_wake) {
        futex_wake_all(r->notify, 0);
        r->wakes++;
        return 1;
    }
    return 0;
}

/* begin(version) -> (v, i, s), or None when version (0: latest + 1) is not newer
 * than the latest or beyond MAX_VERSION. */
static PyObject *Ring_begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t version, v, i, s;
    if (!nargs_ok(nargs, 1, "begin") || arg_u64(args[0], &version) < 0)
        return NULL;
    if (!r->writable) {
        PyErr_SetString(PyExc_PermissionError, "read-only ring");
        return NULL;
    }
    if (!ring_begin(r, version, &v, &i, &s))
        Py_RETURN_NONE;
    PyObject *t = PyTuple_New(3);
    if (t == NULL)
        return NULL;
    PyTuple_SetItem(t, 0, PyLong_FromUnsignedLongLong(v));
    PyTuple_SetItem(t, 1, PyLong_FromUnsignedLongLong(i));
    PyTuple_SetItem(t, 2, PyLong_FromUnsignedLongLong(s));
    return t;
}

/* commit(v, i, s[, wall_ns]) -> True when it made the wake syscall (someone may
 * sleep). wall_ns, when not 0, is the commit time to record instead of now (a
 * bridge keeps its upstream's). */
static PyObject *Ring_commit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t v, i, s, wall = 0;
    if (nargs == 4) {
        if (arg_u64(args[3], &wall) < 0)
            return NULL;
        nargs = 3;
    }
    if (!nargs_ok(nargs, 3, "commit") || arg_u64(args[0], &v) < 0 || arg_slot(r, args[1], &i) < 0 ||
        arg_u64(args[2], &s) < 0)
        return NULL;
    if (!r->writable) {
        PyErr_SetString(PyExc_PermissionError, "read-only ring");
        return NULL;
    }
    return PyBool_FromLong(ring_commit(r, v, i, s, wall));
}

/* The bytes of a bytes or bytearray object of exactly the slot's size, or NULL
 * (with no exception set) for anything else. */
static char *small_bytes(Ring *r, PyObject *o, int writable) {
    char *p = NULL;
    Py_ssize_t n = -1;
    if (!writable && PyBytes_Check(o)) {
        p = PyBytes_AsString(o);
        n = PyBytes_Size(o);
    } else if (PyByteArray_Check(o)) {
        p = PyByteArray_AsString(o);
        n = PyByteArray_Size(o);
    }
    if (p == NULL || n < 0 || (uint64_t)n != r->nbytes) {
        PyErr_Clear();
        return NULL;
    }
    return p;
}

/* write_from(data, version, wall_ns, threshold) -> v | 0 | -1: begin, copy and
 * commit in one call, for the writers of small versions that arrive as bytes (a
 * bridge's importer): the fewer steps between a wake-up and a commit, the fewer run
 * with cold caches. v: committed; 0: version not newer than the latest or beyond
 * MAX_VERSION (nothing written); -1: not for this path (nothing written): data is
 * not a bytes or bytearray of exactly nbytes, the ring is read-only, or nbytes is
 * threshold or more (such copies run without the GIL, which a bytearray that may be
 * resized meanwhile cannot allow here; the caller's general path does them). */
static PyObject *Ring_write_from(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t version, wall, threshold, v, i, s;
    if (!nargs_ok(nargs, 4, "write_from") || arg_u64(args[1], &version) < 0 ||
        arg_u64(args[2], &wall) < 0 || arg_u64(args[3], &threshold) < 0)
        return NULL;
    const char *src = r->writable && r->nbytes < threshold ? small_bytes(r, args[0], 0) : NULL;
    if (src == NULL)
        return PyLong_FromLong(-1);
    if (!ring_begin(r, version, &v, &i, &s))
        return PyLong_FromLong(0);
    memcpy(slot_data(r, i), src, r->nbytes);
    ring_commit(r, v, i, s, wall);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *Ring_abort(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t i, s;
    if (!nargs_ok(nargs, 2, "abort") || arg_slot(r, args[0], &i) < 0 || arg_u64(args[1], &s) < 0)
        return NULL;
    if (!r->writable) {
        PyErr_SetString(PyExc_PermissionError, "read-only ring");
        return NULL;
    }
    au64 *c = ctl(r, i);
    atomic_store_explicit(&c[S_VERSION], 0, RLX); /* the old bytes are gone */
    atomic_store_explicit(&c[S_SEQ], s + 2, REL);
    Py_RETURN_NONE;
}

static PyObject *Ring_heartbeat(PyObject *self, PyObject *unused) {
    (void)unused;
    Ring *r = (Ring *)self;
    if (!r->writable) {
        PyErr_SetString(PyExc_PermissionError, "read-only ring");
        return NULL;
    }
    atomic_store_explicit(&r->hdr[W_HEARTBEAT], (uint64_t)mono_ns(), RLX);
    Py_RETURN_NONE;
}

/* Copies between a slot and caller memory; the GIL is released from `threshold`
 * bytes on (the caller's arguments keep both buffers alive meanwhile). */
static PyObject *ring_copy(Ring *r, PyObject *const *args, Py_ssize_t nargs, int in) {
    uint64_t i, n, threshold;
    if (!nargs_ok(nargs, 5, in ? "copy_in" : "copy_out") || arg_slot(r, args[0], &i) < 0)
        return NULL;
    void *addr = PyLong_AsVoidPtr(args[1]);
    if (addr == NULL && PyErr_Occurred())
        return NULL;
    /* args[2]: the object that owns addr, held by the caller for the call */
    if (arg_u64(args[3], &n) < 0 || arg_u64(args[4], &threshold) < 0)
        return NULL;
    if (addr == NULL || n > r->nbytes) {
        PyErr_SetString(PyExc_ValueError, "copy: no buffer, or more bytes than a slot holds");
        return NULL;
    }
    if (in && !r->writable) {
        PyErr_SetString(PyExc_PermissionError, "read-only ring");
        return NULL;
    }
    char *slot = slot_data(r, i);
    char *dst = in ? slot : (char *)addr;
    const char *src = in ? (const char *)addr : slot;
    if (n >= threshold) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src, n);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(dst, src, n);
    }
    Py_RETURN_NONE;
}

static PyObject *Ring_copy_in(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return ring_copy((Ring *)self, args, nargs, 1);
}
static PyObject *Ring_copy_out(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return ring_copy((Ring *)self, args, nargs, 0);
}

/* acquire_latest(with_mono) -> (v, i, s, wall[, mono]) | 0 (nothing yet) | -(v+1)
 * (stuck at v). */
static PyObject *Ring_acquire_latest(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    if (!nargs_ok(nargs, 1, "acquire_latest"))
        return NULL;
    int with_mono = PyObject_IsTrue(args[0]);
    if (with_mono < 0)
        return NULL;
    Look k;
    int rc = look_latest(r, &k);
    return look_result(r, rc, &k, with_mono);
}

/* acquire(v, with_mono) -> (v, i, s, wall[, mono]) | None: the slot holding exactly
 * v, whole. */
static PyObject *Ring_acquire(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t v;
    if (!nargs_ok(nargs, 2, "acquire") || arg_u64(args[0], &v) < 0)
        return NULL;
    int with_mono = PyObject_IsTrue(args[1]);
    if (with_mono < 0)
        return NULL;
    Look k;
    if (v > 0)
        for (uint64_t i = 0; i < r->slots; i++)
            if (try_slot(r, i, v, &k))
                return look_tuple(&k, with_mono);
    Py_RETURN_NONE;
}

/* The reader's second look: slot i still holds what seq s said when it was looked
 * at, so every byte read from it since is that version's. */
static inline int ring_validate(Ring *r, uint64_t i, uint64_t s) {
    /* Every load of the slot before the second look at seq (read_seqcount_retry). */
    atomic_thread_fence(ACQ);
    return atomic_load_explicit(&ctl(r, i)[S_SEQ], RLX) == s;
}

/* read_to(out, threshold) -> (v, wall) | v | None: the latest version copied into
 * the bytearray out and validated, in one call (write_from's reading side: an
 * exporter's staging buffer). (v, wall): out holds version v, whole; v (an int):
 * the writer overwrote v's slot during the copy, out holds no version; None: not
 * for this path (nothing copied): out is not a bytearray of exactly nbytes, nbytes
 * is threshold or more, nothing was published yet, or the ring is stuck; the
 * caller's general path says which. */
static PyObject *Ring_read_to(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t threshold;
    if (!nargs_ok(nargs, 2, "read_to") || arg_u64(args[1], &threshold) < 0)
        return NULL;
    char *dst = r->nbytes < threshold ? small_bytes(r, args[0], 1) : NULL;
    Look k;
    if (dst == NULL || look_latest(r, &k) != 1)
        Py_RETURN_NONE;
    memcpy(dst, slot_data(r, k.slot), r->nbytes);
    stall(r->stall_ns, &r->rng); /* tests: a window for the writer to lap the slot */
    if (!ring_validate(r, k.slot, k.seq))
        return PyLong_FromUnsignedLongLong(k.version);
    PyObject *t = PyTuple_New(2);
    if (t == NULL)
        return NULL;
    PyTuple_SetItem(t, 0, PyLong_FromUnsignedLongLong(k.version));
    PyTuple_SetItem(t, 1, PyLong_FromUnsignedLongLong(k.wall));
    return t;
}

static PyObject *Ring_validate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t i, s;
    if (!nargs_ok(nargs, 2, "validate") || arg_slot(r, args[0], &i) < 0 || arg_u64(args[1], &s) < 0)
        return NULL;
    return PyBool_FromLong(ring_validate(r, i, s));
}

static PyObject *Ring_slot_times(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t i;
    if (!nargs_ok(nargs, 1, "slot_times") || arg_slot(r, args[0], &i) < 0)
        return NULL;
    au64 *c = ctl(r, i);
    PyObject *t = PyTuple_New(2);
    if (t == NULL)
        return NULL;
    PyTuple_SetItem(t, 0, PyLong_FromUnsignedLongLong(atomic_load_explicit(&c[S_WALL], RLX)));
    PyTuple_SetItem(t, 1, PyLong_FromUnsignedLongLong(atomic_load_explicit(&c[S_MONO], RLX)));
    return t;
}

static PyObject *Ring_monotonic_ns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t i;
    if (!nargs_ok(nargs, 1, "monotonic_ns") || arg_slot(r, args[0], &i) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&ctl(r, i)[S_MONO], RLX));
}

/* ---- waiting ---- */

/* Announce a sleeper (see the top of the file). */
static inline void announce(Ring *r) {
    if (r->flag != NULL)
        atomic_fetch_or_explicit(r->flag, 1, SEQ);
}
static inline int still_announced(Ring *r) {
    return r->flag == NULL || atomic_load_explicit(r->flag, ACQ) != 0;
}
/* How long a waiter may sleep: a reader that could not announce itself to a
 * writer that skips unwatched wakes caps its sleeps (it polls). */
static inline int64_t sleep_deadline(Ring *r, int64_t deadline_ns) {
    if (r->flag != NULL || r->poll_ns <= 0)
        return deadline_ns;
    int64_t cap = mono_ns() + r->poll_ns;
    return (deadline_ns < 0 || cap < deadline_ns) ? cap : deadline_ns;
}

/* Wait until latest > after. Returns 1 (latest in *v), 0 on timeout (*v latest),
 * -1 with a Python exception (a signal handler raised). */
static int ring_wait(Ring *r, uint64_t after, int64_t deadline_ns, int spin, uint64_t *v) {
    for (;;) {
        *v = atomic_load_explicit(&r->hdr[W_LATEST], ACQ);
        if (*v > after)
            return 1;
        if (spin) {
            int check_signals = 0, timed_out = 0;
            int64_t signal_at = mono_ns() + SIGNAL_NS;
            Py_BEGIN_ALLOW_THREADS
            for (uint64_t n = 1;; n++) {
                if (atomic_load_explicit(&r->hdr[W_LATEST], ACQ) > after)
                    break;
                cpu_relax();
                if (n % SPIN_CHECK == 0) {
                    int64_t now = mono_ns();
                    if (deadline_ns >= 0 && now >= deadline_ns) {
                        timed_out = 1;
                        break;
                    }
                    if (now >= signal_at) {
                        check_signals = 1;
                        break;
                    }
                }
            }
            Py_END_ALLOW_THREADS
            if (timed_out) {
                *v = atomic_load_explicit(&r->hdr[W_LATEST], ACQ);
                return *v > after;
            }
            if (check_signals && PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        if (deadline_ns >= 0 && mono_ns() >= deadline_ns)
            return 0;
        announce(r);
        stall(r->stall_ns, &r->rng);
        uint32_t w = atomic_load_explicit(r->notify, ACQ);
        *v = atomic_load_explicit(&r->hdr[W_LATEST], ACQ);
        if (*v > after)
            return 1;
        stall(r->stall_ns, &r->rng);
        if (!still_announced(r))
            continue; /* a commit cleared the flag since: announce again */
        stall(r->stall_ns, &r->rng);
        int err;
        int64_t until = sleep_deadline(r, deadline_ns);
        Py_BEGIN_ALLOW_THREADS
        err = futex_wait_abs(r->notify, w, until);
        Py_END_ALLOW_THREADS
        if (err == EINTR && PyErr_CheckSignals() < 0)
            return -1;
    }
}

static int parse_wait_args(Ring *r, PyObject *const *args, Py_ssize_t nargs, const char *name,
                           uint64_t *after, int64_t *deadline, int *spin) {
    if (!nargs_ok(nargs, 3, name) || ring_closed_check(r) < 0 || arg_u64(args[0], after) < 0 ||
        arg_deadline(args[1], deadline) < 0)
        return -1;
    *spin = PyObject_IsTrue(args[2]);
    return *spin < 0 ? -1 : 0;
}

/* wait(after, timeout, spin) -> the latest version (newer than after unless timed out) */
static PyObject *Ring_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    uint64_t after, v;
    int64_t deadline;
    int spin;
    if (parse_wait_args(r, args, nargs, "wait", &after, &deadline, &spin) < 0)
        return NULL;
    if (ring_wait(r, after, deadline, spin, &v) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(v);
}

/* wait_acquire(after, timeout, spin) / wait_read(...): wait, then look at the latest
 * version's slot. None on timeout; an int as acquire_latest returns it when stuck. */
static PyObject *ring_wait_look(Ring *r, PyObject *const *args, Py_ssize_t nargs, int with_mono) {
    uint64_t after, v;
    int64_t deadline;
    int spin;
    if (parse_wait_args(r, args, nargs, with_mono ? "wait_read" : "wait_acquire", &after, &deadline,
                        &spin) < 0)
        return NULL;
    for (;;) {
        int rc = ring_wait(r, after, deadline, spin, &v);
        if (rc < 0)
            return NULL;
        if (rc == 0)
            Py_RETURN_NONE;
        Look k;
        rc = look_latest(r, &k);
        if (rc == 1 && k.version <= after)
            continue; /* cannot happen with versions going forward; never hand out an old one */
        return look_result(r, rc, &k, with_mono);
    }
}

static PyObject *Ring_wait_acquire(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return ring_wait_look((Ring *)self, args, nargs, 0);
}
static PyObject *Ring_wait_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return ring_wait_look((Ring *)self, args, nargs, 1);
}

/* map_waiters(fd): a reader's writable mapping of the first page, for the waiters
 * word only. fd must be the segment's object opened read-write. */
static PyObject *Ring_map_waiters(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    if (!nargs_ok(nargs, 1, "map_waiters"))
        return NULL;
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (r->flag != NULL)
        Py_RETURN_NONE;
    void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, (int)fd, 0);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    r->flag_page = p;
    r->flag = (au32 *)((char *)p + WAITERS_OFF);
    Py_RETURN_NONE;
}

/* set_stall(ns): tests only, see stall(). */
static PyObject *Ring_set_stall(PyObject *self, PyObject *arg) {
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    ((Ring *)self)->stall_ns = ns;
    Py_RETURN_NONE;
}

static PyObject *Ring_set_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    if (!nargs_ok(nargs, 1, "set_poll"))
        return NULL;
    double t = PyFloat_AsDouble(args[0]);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    r->poll_ns = t > 0 ? (int64_t)(t * 1e9) : 0;
    Py_RETURN_NONE;
}

/* state() -> (waiters word, notify word, commits, wakes): for tests and tools. */
static PyObject *Ring_state(PyObject *self, PyObject *unused) {
    (void)unused;
    Ring *r = (Ring *)self;
    uint32_t flag = atomic_load_explicit((au32 *)(r->base + WAITERS_OFF), ACQ);
    return Py_BuildValue("(IIKKi)", flag, atomic_load_explicit(r->notify, ACQ),
                         (unsigned long long)r->commits, (unsigned long long)r->wakes,
                         r->flag != NULL);
}

/* same_object(path, fd): whether `path` (a symbolic link is not followed) names
 * the object this ring maps, open as `fd`: (st_dev, st_ino) compared. The
 * object's own identity never changes, so it is taken once (fstat of `fd`, at the
 * first call) and kept here; each call then makes one fstatat of the path. False
 * on any error (the name gone; EBADF from a handle closed before the first call).
 * Segment.linked() (reads of the latest make it at every read) takes the identity
 * at open: os.fstat and os.stat at every call took more than twice as long (two
 * syscalls, two stat_result objects). The fields are written with the GIL held,
 * after the syscalls (two threads' first calls store the same values). */
static PyObject *Ring_same_object(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    if (!nargs_ok(nargs, 2, "same_object"))
        return NULL;
    long fd = PyLong_AsLong(args[1]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    PyObject *path = NULL;
    if (!PyUnicode_FSConverter(args[0], &path))
        return NULL;
    const char *cpath = PyBytes_AsString(path);
    if (cpath == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    int known = r->obj_known;
    if (!known && (fd < 0 || fd > INT_MAX)) { /* -1: a closed handle's */
        Py_DECREF(path);
        Py_RETURN_FALSE;
    }
    struct stat mine, there;
    int ok_mine = 1, ok_there;
    Py_BEGIN_ALLOW_THREADS
    if (!known)
        ok_mine = fstat((int)fd, &mine) == 0;
    ok_there = ok_mine && fstatat(AT_FDCWD, cpath, &there, AT_SYMLINK_NOFOLLOW) == 0;
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (!ok_mine)
        Py_RETURN_FALSE;
    if (!known) {
        r->obj_dev = (uint64_t)mine.st_dev;
        r->obj_ino = (uint64_t)mine.st_ino;
        r->obj_known = 1;
    }
    return PyBool_FromLong(ok_there && (uint64_t)there.st_dev == r->obj_dev &&
                           (uint64_t)there.st_ino == r->obj_ino);
}

static PyMethodDef Ring_methods[] = {
    {"latest", Ring_latest, METH_NOARGS, "The latest committed version (acquire load)."},
    {"begin", (PyCFunction)(void (*)(void))Ring_begin, METH_FASTCALL, NULL},
    {"commit", (PyCFunction)(void (*)(void))Ring_commit, METH_FASTCALL, NULL},
    {"abort", (PyCFunction)(void (*)(void))Ring_abort, METH_FASTCALL, NULL},
    {"write_from", (PyCFunction)(void (*)(void))Ring_write_from, METH_FASTCALL, NULL},
    {"read_to", (PyCFunction)(void (*)(void))Ring_read_to, METH_FASTCALL, NULL},
    {"heartbeat", Ring_heartbeat, METH_NOARGS, NULL},
    {"copy_in", (PyCFunction)(void (*)(void))Ring_copy_in, METH_FASTCALL, NULL},
    {"copy_out", (PyCFunction)(void (*)(void))Ring_copy_out, METH_FASTCALL, NULL},
    {"acquire_latest", (PyCFunction)(void (*)(void))Ring_acquire_latest, METH_FASTCALL, NULL},
    {"acquire", (PyCFunction)(void (*)(void))Ring_acquire, METH_FASTCALL, NULL},
    {"validate", (PyCFunction)(void (*)(void))Ring_validate, METH_FASTCALL, NULL},
    {"slot_times", (PyCFunction)(void (*)(void))Ring_slot_times, METH_FASTCALL, NULL},
    {"monotonic_ns", (PyCFunction)(void (*)(void))Ring_monotonic_ns, METH_FASTCALL, NULL},
    {"wait", (PyCFunction)(void (*)(void))Ring_wait, METH_FASTCALL, NULL},
    {"wait_acquire", (PyCFunction)(void (*)(void))Ring_wait_acquire, METH_FASTCALL, NULL},
    {"wait_read", (PyCFunction)(void (*)(void))Ring_wait_read, METH_FASTCALL, NULL},
    {"map_waiters", (PyCFunction)(void (*)(void))Ring_map_waiters, METH_FASTCALL, NULL},
    {"set_poll", (PyCFunction)(void (*)(void))Ring_set_poll, METH_FASTCALL, NULL},
    {"state", Ring_state, METH_NOARGS, NULL},
    {"same_object", (PyCFunction)(void (*)(void))Ring_same_object, METH_FASTCALL, NULL},
    {"set_stall", Ring_set_stall, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Ring_slots[] = {
    {Py_tp_new, Ring_new},
    {Py_tp_dealloc, Ring_dealloc},
    {Py_tp_methods, Ring_methods},
    {Py_tp_doc, "One segment's seqlock and wake, over a mapping that `owner` keeps alive."},
    {0, NULL},
};

static PyType_Spec Ring_spec = {
    "shmcast.broker._core.Ring",
    sizeof(Ring),
    0,
    Py_TPFLAGS_DEFAULT,
    Ring_slots,
};

/* ------------------------------------------------------------------ wait_any */

/* Sleeping on more words than one futex_waitv takes: the first group is waited on
 * by the calling thread, every further group by a helper thread; each group also
 * waits on a private `done` word, which whoever returns first sets and wakes, so
 * all of them return together. Helpers are started and joined per sleep (no
 * thread outlives the call; fork stays safe) with every signal blocked, so that
 * signals reach the caller's own futex_waitv. */
#define GROUP (WAITV_MAX - 1)

typedef struct {
    struct shm_waitv *v;
    unsigned n;
    int64_t deadline_ns;
    au32 *done;
} Group;

static void group_sleep(Group *g) {
    int err = futex_waitv_abs(g->v, g->n, g->deadline_ns);
    (void)err;
    atomic_store_explicit(g->done, 1, REL);
    futex_wake_all(g->done, 1);
}

static void *group_main(void *arg) {
    group_sleep((Group *)arg);
    return NULL;
}

/* Sleep on n words (entries v[k] for k < n already filled) plus the private done
 * word, until one changes, a wake-up, deadline or signal. Needs room for one extra
 * entry per group. Called without the GIL. Returns 0, or ENOSYS without waitv. */
static int sleep_many(struct shm_waitv *words, unsigned n, int64_t deadline_ns) {
    au32 done = 0;
    unsigned groups = n <= WAITV_MAX ? 1 : (n + GROUP - 1) / GROUP;
    if (groups == 1) {
        int err = futex_waitv_abs(words, n, deadline_ns);
        return err == ENOSYS ? ENOSYS : 0;
    }
    struct shm_waitv *v = malloc(sizeof(*v) * (n + groups));
    Group *g = malloc(sizeof(*g) * groups);
    pthread_t *tid = malloc(sizeof(*tid) * groups);
    int *started = calloc(groups, sizeof(int));
    if (v == NULL || g == NULL || tid == NULL || started == NULL) {
        free(v);
        free(g);
        free(tid);
        free(started);
        return ENOMEM;
    }
    unsigned pos = 0;
    for (unsigned k = 0; k < groups; k++) {
        unsigned take = n - k * GROUP < GROUP ? n - k * GROUP : GROUP;
        g[k].v = v + pos;
        memcpy(g[k].v, words + k * GROUP, sizeof(*v) * take);
        g[k].v[take].val = 0;
        g[k].v[take].uaddr = (uint64_t)(uintptr_t)&done;
        g[k].v[take].flags = SHM_FUTEX2_SIZE_U32 | SHM_FUTEX2_PRIVATE;
        g[k].v[take].reserved = 0;
        g[k].n = take + 1;
        g[k].deadline_ns = deadline_ns;
        g[k].done = &done;
        pos += take + 1;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int missing = 0;
    for (unsigned k = 1; k < groups; k++) {
        started[k] = pthread_create(&tid[k], NULL, group_main, &g[k]) == 0;
        missing |= !started[k];
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (missing && (deadline_ns < 0 || deadline_ns - mono_ns() > 10000000LL))
        g[0].deadline_ns = mono_ns() + 10000000LL; /* no thread for a group: poll it */
    group_sleep(&g[0]);
    for (unsigned k = 1; k < groups; k++)
        if (started[k])
            pthread_join(tid[k], NULL);
    free(v);
    free(g);
    free(tid);
    free(started);
    return 0;
}

static int arg_addr(PyObject *o, void **addr);

/* wait_any(rings, afters, timeout[, word_addr, word_val]) -> True when one ring's
 * latest is newer than its after, or the extra 32-bit futex word at word_addr (the
 * namespace word of the subscribers) no longer holds word_val; False on timeout.
 * Any number of rings. Each ring's sleeper is announced in its waiters word; the
 * extra word is only slept on (whoever moves it wakes it unconditionally). */
static PyObject *core_wait_any(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    au32 *xw = NULL;
    uint64_t xval = 0;
    if (nargs == 5) {
        void *xaddr;
        if (arg_addr(args[3], &xaddr) < 0 || arg_u64(args[4], &xval) < 0)
            return NULL;
        xw = (au32 *)xaddr;
        nargs = 3;
    }
    if (!nargs_ok(nargs, 3, "wait_any"))
        return NULL;
    PyObject *rings = args[0], *afters_o = args[1];
    if (!PyTuple_Check(rings) || !PyTuple_Check(afters_o) ||
        PyTuple_Size(rings) != PyTuple_Size(afters_o)) {
        PyErr_SetString(PyExc_TypeError, "wait_any takes two tuples of the same length");
        return NULL;
    }
    Py_ssize_t n = PyTuple_Size(rings);
    int64_t deadline;
    if (arg_deadline(args[2], &deadline) < 0)
        return NULL;
    if (n == 0)
        Py_RETURN_FALSE;
    Ring **r = PyMem_Malloc(sizeof(*r) * n);
    uint64_t *after = PyMem_Malloc(sizeof(*after) * n);
    struct shm_waitv *v = PyMem_Malloc(sizeof(*v) * (n + 1));
    PyObject *result = NULL;
    if (r == NULL || after == NULL || v == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    int64_t poll_ns = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *o = PyTuple_GetItem(rings, k);
        if (!PyObject_TypeCheck(o, (PyTypeObject *)RingType)) {
            PyErr_SetString(PyExc_TypeError, "wait_any takes rings of the compiled core");
            goto out;
        }
        r[k] = (Ring *)o;
        if (arg_u64(PyTuple_GetItem(afters_o, k), &after[k]) < 0)
            goto out;
        if (r[k]->flag == NULL && r[k]->poll_ns > 0 && (poll_ns == 0 || r[k]->poll_ns < poll_ns))
            poll_ns = r[k]->poll_ns;
    }
    for (;;) {
        for (Py_ssize_t k = 0; k < n; k++)
            if (atomic_load_explicit(&r[k]->hdr[W_LATEST], ACQ) > after[k]) {
                result = Py_True;
                goto out;
            }
        if (xw != NULL && atomic_load_explicit(xw, ACQ) != (uint32_t)xval) {
            result = Py_True;
            goto out;
        }
        if (deadline >= 0 && mono_ns() >= deadline) {
            result = Py_False;
            goto out;
        }
        for (Py_ssize_t k = 0; k < n; k++)
            announce(r[k]);
        for (Py_ssize_t k = 0; k < n; k++) {
            v[k].val = atomic_load_explicit(r[k]->notify, ACQ);
            v[k].uaddr = (uint64_t)(uintptr_t)r[k]->notify;
            v[k].flags = SHM_FUTEX2_SIZE_U32;
            v[k].reserved = 0;
        }
        Py_ssize_t words = n;
        if (xw != NULL) { /* asleep on the expected value: a move since returns at once */
            v[n].val = (uint32_t)xval;
            v[n].uaddr = (uint64_t)(uintptr_t)xw;
            v[n].flags = SHM_FUTEX2_SIZE_U32;
            v[n].reserved = 0;
            words = n + 1;
        }
        int again = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            if (atomic_load_explicit(&r[k]->hdr[W_LATEST], ACQ) > after[k]) {
                result = Py_True;
                goto out;
            }
        }
        for (Py_ssize_t k = 0; k < n && !again; k++)
            again = !still_announced(r[k]);
        if (again)
            continue;
        int64_t until = deadline;
        if (poll_ns > 0) {
            int64_t cap = mono_ns() + poll_ns;
            if (until < 0 || cap < until)
                until = cap;
        }
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = sleep_many(v, (unsigned)words, until);
        if (err == ENOSYS) { /* kernel before 5.16: the first word, in short sleeps */
            int64_t cap = mono_ns() + 500000;
            futex_wait_abs(r[0]->notify, (uint32_t)v[0].val, until < 0 || cap < until ? cap : until);
        }
        Py_END_ALLOW_THREADS
        if (err == ENOMEM) {
            PyErr_NoMemory();
            goto out;
        }
        if (PyErr_CheckSignals() < 0)
            goto out;
    }
out:
    PyMem_Free(r);
    PyMem_Free(after);
    PyMem_Free(v);
    Py_XINCREF(result);
    return result;
}

/* ------------------------------------------------------------------ raw futex */

static int arg_addr(PyObject *o, void **addr) {
    *addr = PyLong_AsVoidPtr(o);
    if (*addr == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "null address");
        return -1;
    }
    if ((uintptr_t)*addr % 4) {
        PyErr_SetString(PyExc_ValueError, "a futex word is 4-byte aligned");
        return -1;
    }
    return 0;
}

/* futex_wait(addr, expected, timeout): one shared futex word (GIL released). */
static PyObject *core_futex_wait(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    void *addr;
    uint64_t expected;
    int64_t deadline;
    if (!nargs_ok(nargs, 3, "futex_wait") || arg_addr(args[0], &addr) < 0 ||
        arg_u64(args[1], &expected) < 0 || arg_deadline(args[2], &deadline) < 0)
        return NULL;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = futex_wait_abs((au32 *)addr, (uint32_t)expected, deadline);
    Py_END_ALLOW_THREADS
    if (err == EINTR && PyErr_CheckSignals() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_futex_wake(PyObject *mod, PyObject *arg) {
    (void)mod;
    void *addr;
    if (arg_addr(arg, &addr) < 0)
        return NULL;
    return PyLong_FromLong(futex_wake_all((au32 *)addr, 0));
}

/* futex_waitv(addrs, expected, deadline): at most WAITV_MAX words; deadline is
 * time.monotonic() seconds or None. Returns False when futex_waitv is missing. */
static PyObject *core_futex_waitv(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (!nargs_ok(nargs, 3, "futex_waitv"))
        return NULL;
    PyObject *addrs = PySequence_Tuple(args[0]);
    PyObject *vals = addrs ? PySequence_Tuple(args[1]) : NULL;
    PyObject *result = NULL;
    if (vals == NULL)
        goto out;
    Py_ssize_t n = PyTuple_Size(addrs);
    if (n != PyTuple_Size(vals) || n > WAITV_MAX || n == 0) {
        PyErr_Format(PyExc_ValueError, "futex_waitv takes 1 to %d words", WAITV_MAX);
        goto out;
    }
    int64_t deadline = -1;
    if (args[2] != Py_None) {
        double d = PyFloat_AsDouble(args[2]);
        if (d == -1.0 && PyErr_Occurred())
            goto out;
        deadline = d > 0 ? (int64_t)(d * 1e9) : 0;
    }
    struct shm_waitv v[WAITV_MAX];
    for (Py_ssize_t k = 0; k < n; k++) {
        void *addr;
        uint64_t val;
        if (arg_addr(PyTuple_GetItem(addrs, k), &addr) < 0 ||
            arg_u64(PyTuple_GetItem(vals, k), &val) < 0)
            goto out;
        v[k].val = (uint32_t)val;
        v[k].uaddr = (uint64_t)(uintptr_t)addr;
        v[k].flags = SHM_FUTEX2_SIZE_U32;
        v[k].reserved = 0;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = futex_waitv_abs(v, (unsigned)n, deadline);
    Py_END_ALLOW_THREADS
    if (err == EINTR && PyErr_CheckSignals() < 0)
        goto out;
    result = err == ENOSYS ? Py_False : Py_True;
    Py_INCREF(result);
out:
    Py_XDECREF(addrs);
    Py_XDECREF(vals);
    return result;
}

/* fence(): a full (seq_cst) fence, for the header's magic word at creation. */
static PyObject *core_fence(PyObject *mod, PyObject *unused) {
    (void)mod;
    (void)unused;
    atomic_thread_fence(SEQ);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"wait_any", (PyCFunction)(void (*)(void))core_wait_any, METH_FASTCALL, NULL},
    {"futex_wait", (PyCFunction)(void (*)(void))core_futex_wait, METH_FASTCALL, NULL},
    {"futex_wake", core_futex_wake, METH_O, NULL},
    {"futex_waitv", (PyCFunction)(void (*)(void))core_futex_waitv, METH_FASTCALL, NULL},
    {"fence", core_fence, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    "shmcast.broker._core",
    "The compiled core of shmcast's segment engine (private; see broker/_segment.py).",
    -1,
    core_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    if (RingType == NULL) {
        RingType = PyType_FromSpec(&Ring_spec);
        if (RingType == NULL)
            goto fail;
    }
    Py_INCREF(RingType);
    if (PyModule_AddObject(m, "Ring", RingType) < 0) {
        Py_DECREF(RingType);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "LAYOUT_VERSION", LAYOUT_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "W_LATEST", W_LATEST) < 0 ||
        PyModule_AddIntConstant(m, "W_HEARTBEAT", W_HEARTBEAT) < 0 ||
        PyModule_AddIntConstant(m, "W_LATEST_SLOT", W_LATEST_SLOT) < 0 ||
        PyModule_AddIntConstant(m, "NOTIFY_OFF", NOTIFY_OFF) < 0 ||
        PyModule_AddIntConstant(m, "WAITERS_OFF", WAITERS_OFF) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_CTL", SLOT_CTL) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_CTL_SIZE", SLOT_CTL_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", MAX_SLOTS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LOOKS", MAX_LOOKS) < 0 ||
        PyModule_AddIntConstant(m, "WAITV_MAX", WAITV_MAX) < 0)
        goto fail;
#if defined(__clang__)
    const char *compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
    const char *compiler = "gcc " __VERSION__;
#else
    const char *compiler = "a C11 compiler";
#endif
    if (PyModule_AddStringConstant(m, "COMPILER", compiler) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
