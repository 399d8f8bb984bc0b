/* The compiled replay of a load-and-steps request program on PyTorch's CUDA caching
 * allocator: the same rules, in the same order, as the pure-Python
 * `vramcalc.memory.allocator.replay.CachingAllocator` (its module docstring lists them, from
 * c10/cuda/CUDACachingAllocator.cpp), for one stream. Every function below is named after
 * the Python method it mirrors; `vramcalc.memory.allocator.replay.replay_program` calls this one
 * or the Python one, and tests/memory/allocator/test_replay_engines.py checks that both give the same
 * numbers.
 *
 * Optional: setup.py builds it with `optional=True`, so an install without a compiler
 * keeps the Python replay.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1LL << 20)
#define MIN_BLOCK 512LL
#define SMALL_SIZE MIB
#define SMALL_BUFFER (2 * MIB)
#define LARGE_BUFFER (20 * MIB)
#define MIN_LARGE_ALLOC (10 * MIB)
#define ROUND_LARGE (2 * MIB)
#define SEGMENT_GAP (1LL << 40)
#define UNBOUNDED (1LL << 50)

typedef struct {
    int64_t addr, size;
    int32_t prev, next; /* -1: none */
    uint8_t small, allocated, mapped;
} Block;

/* A pool's free blocks in (size, address) order: the sizes present, ascending, each with
 * its blocks by address, descending (the lowest address, which best fit takes, last). */
typedef struct {
    int64_t addr;
    int32_t idx;
} Slot;

typedef struct {
    Slot *s;
    int32_t n, cap;
} Bucket;

typedef struct {
    int64_t size;
    int32_t bucket;
} SizeEntry;

typedef struct {
    SizeEntry *e; /* only sizes with a block */
    Py_ssize_t n, cap;
    Bucket *buckets;
    int32_t nb, capb;
    int32_t *spare; /* empty buckets, reused */
    int32_t nspare, capspare;
} Pool;

typedef struct {
    Block *b;
    int32_t n, cap;
    int32_t *spare; /* indices of absorbed blocks, reused */
    int32_t nspare, capspare;
    Pool pools[2]; /* [0] large, [1] small */
    int32_t chains[2]; /* expandable: first block of each pool's segment, -1 none */
    int expandable;
    int64_t reserved, allocated, peak_reserved, peak_allocated, next_addr;
    /* CachingAllocator.descending: new segments at ever lower addresses, from 2**63 down
     * (CachingAllocator._next_down) */
    int descending;
    uint64_t next_down;
    /* the rounded requested bytes alive, and their peak (step_requests.requested_peaks) */
    int64_t requested, peak_requested;
    int oom; /* 1 after a failed realloc */
} Sim;

static int32_t new_block(Sim *s, int64_t addr, int64_t size, int small, int allocated,
                         int mapped) {
    int32_t i;
    if (s->nspare > 0) {
        i = s->spare[--s->nspare];
    } else {
        if (s->n == s->cap) {
            int32_t cap = s->cap ? 2 * s->cap : 1024;
            Block *nb = realloc(s->b, (size_t)cap * sizeof(Block));
            if (nb == NULL) {
                s->oom = 1;
                return -1;
            }
            s->b = nb;
            s->cap = cap;
        }
        i = s->n++;
    }
    Block *b = &s->b[i];
    b->addr = addr;
    b->size = size;
    b->prev = b->next = -1;
    b->small = (uint8_t)small;
    b->allocated = (uint8_t)allocated;
    b->mapped = (uint8_t)mapped;
    return i;
}

static void drop_block(Sim *s, int32_t i) {
    if (s->nspare == s->capspare) {
        int32_t cap = s->capspare ? 2 * s->capspare : 256;
        int32_t *ns = realloc(s->spare, (size_t)cap * sizeof(int32_t));
        if (ns == NULL) {
            return; /* the index is simply not reused */
        }
        s->spare = ns;
        s->capspare = cap;
    }
    s->spare[s->nspare++] = i;
}

/* first size entry not less than `size` */
static Py_ssize_t lower_bound(const Pool *p, int64_t size) {
    Py_ssize_t lo = 0, hi = p->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (p->e[mid].size < size) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* in a bucket (addresses descending): the first slot whose address is not above `addr` */
static int32_t slot_at(const Bucket *bk, int64_t addr) {
    int32_t lo = 0, hi = bk->n;
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (bk->s[mid].addr > addr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static int grow_array(void **arr, int64_t *cap, size_t item, int64_t need) {
    if (need <= *cap) {
        return 0;
    }
    int64_t c = *cap ? 2 * *cap : 64;
    while (c < need) {
        c *= 2;
    }
    void *na = realloc(*arr, (size_t)c * item);
    if (na == NULL) {
        return -1;
    }
    *arr = na;
    *cap = c;
    return 0;
}

/* _Pool.add */
static void pool_add(Sim *s, int32_t bi) {
    const Block *b = &s->b[bi];
    Pool *p = &s->pools[b->small];
    Py_ssize_t i = lower_bound(p, b->size);
    int32_t k;
    if (i < p->n && p->e[i].size == b->size) {
        k = p->e[i].bucket;
    } else {
        if (p->nspare > 0) {
            k = p->spare[--p->nspare];
        } else {
            int64_t capb = p->capb;
            if (grow_array((void **)&p->buckets, &capb, sizeof(Bucket), (int64_t)p->nb + 1) < 0) {
                s->oom = 1;
                return;
            }
            p->capb = (int32_t)capb;
            k = p->nb++;
            p->buckets[k].s = NULL;
            p->buckets[k].n = p->buckets[k].cap = 0;
        }
        int64_t cap = p->cap;
        if (grow_array((void **)&p->e, &cap, sizeof(SizeEntry), (int64_t)p->n + 1) < 0) {
            s->oom = 1;
            return;
        }
        p->cap = (Py_ssize_t)cap;
        memmove(&p->e[i + 1], &p->e[i], (size_t)(p->n - i) * sizeof(SizeEntry));
        p->e[i].size = b->size;
        p->e[i].bucket = k;
        p->n++;
    }
    Bucket *bk = &p->buckets[k];
    int64_t cap = bk->cap;
    if (grow_array((void **)&bk->s, &cap, sizeof(Slot), (int64_t)bk->n + 1) < 0) {
        s->oom = 1;
        return;
    }
    bk->cap = (int32_t)cap;
    int32_t j = slot_at(bk, b->addr);
    memmove(&bk->s[j + 1], &bk->s[j], (size_t)(bk->n - j) * sizeof(Slot));
    bk->s[j].addr = b->addr;
    bk->s[j].idx = bi;
    bk->n++;
}

/* take slot j out of size entry i's bucket; the entry goes when its bucket empties */
static void pool_delete(Pool *p, Py_ssize_t i, int32_t j) {
    int32_t k = p->e[i].bucket;
    Bucket *bk = &p->buckets[k];
    memmove(&bk->s[j], &bk->s[j + 1], (size_t)(bk->n - j - 1) * sizeof(Slot));
    bk->n--;
    if (bk->n == 0) {
        memmove(&p->e[i], &p->e[i + 1], (size_t)(p->n - i - 1) * sizeof(SizeEntry));
        p->n--;
        int64_t cap = p->capspare;
        if (grow_array((void **)&p->spare, &cap, sizeof(int32_t), (int64_t)p->nspare + 1) == 0) {
            p->capspare = (int32_t)cap;
            p->spare[p->nspare++] = k;
        } /* else the bucket is simply not reused */
    }
}

/* _Pool.remove: nothing when the block is not in its pool */
static void pool_remove(Sim *s, int32_t bi) {
    const Block *b = &s->b[bi];
    Pool *p = &s->pools[b->small];
    Py_ssize_t i = lower_bound(p, b->size);
    if (i >= p->n || p->e[i].size != b->size) {
        return;
    }
    const Bucket *bk = &p->buckets[p->e[i].bucket];
    int32_t j = slot_at(bk, b->addr);
    if (j < bk->n && bk->s[j].addr == b->addr) {
        pool_delete(p, i, j);
    }
}

/* _expandable_size */
static int64_t expandable_size(const Sim *s, int32_t bi) {
    const Block *b = &s->b[bi];
    if (b->next >= 0 && !s->b[b->next].mapped) {
        return b->size + s->b[b->next].size;
    }
    return b->size;
}

/* _Pool.best_fit: the first free block in (size, address) order that holds `size` */
static int32_t best_fit(Sim *s, int small, int64_t size) {
    const Pool *p = &s->pools[small];
    Py_ssize_t i = lower_bound(p, size);
    if (i >= p->n) {
        return -1;
    }
    const Bucket *bk = &p->buckets[p->e[i].bucket];
    int32_t j = bk->n - 1;
    int32_t b = bk->s[j].idx;
    if (s->expandable) {
        for (;;) { /* the next block in (size, address) order */
            if (j > 0) {
                j--;
            } else if (i + 1 < p->n) {
                i++;
                bk = &p->buckets[p->e[i].bucket];
                j = bk->n - 1;
            } else {
                break;
            }
            int32_t nxt = bk->s[j].idx;
            if (expandable_size(s, nxt) < expandable_size(s, b)) {
                b = nxt;
            } else {
                break;
            }
        }
    }
    return b;
}

static int64_t allocation_size(int64_t size) {
    if (size <= SMALL_SIZE) {
        return SMALL_BUFFER;
    }
    if (size < MIN_LARGE_ALLOC) {
        return LARGE_BUFFER;
    }
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) / ROUND_LARGE);
}

static int64_t address(Sim *s, int64_t size) {
    if (s->descending) {
        s->next_down -= (uint64_t)(SEGMENT_GAP + size);
        return (int64_t)s->next_down;
    }
    int64_t addr = s->next_addr;
    s->next_addr += SEGMENT_GAP + size;
    return addr;
}

static void grow(Sim *s, int64_t size) {
    s->reserved += size;
    if (s->reserved > s->peak_reserved) {
        s->peak_reserved = s->reserved;
    }
}

/* CachingAllocator._absorb: splice neighbour `o` into `bi` */
static void absorb(Sim *s, int32_t bi, int32_t oi) {
    Block *b = &s->b[bi];
    Block *o = &s->b[oi];
    if (oi == b->prev) {
        b->addr = o->addr;
        b->prev = o->prev;
        if (o->prev >= 0) {
            s->b[o->prev].next = bi;
        } else if (s->chains[b->small] == oi) {
            s->chains[b->small] = bi;
        }
    } else {
        b->next = o->next;
        if (o->next >= 0) {
            s->b[o->next].prev = bi;
        }
    }
    b->size += o->size;
    drop_block(s, oi);
}

/* CachingAllocator._merge */
static int32_t merge(Sim *s, int32_t bi) {
    int32_t o = s->b[bi].prev;
    if (o >= 0 && !s->b[o].allocated && s->b[o].mapped) {
        pool_remove(s, o);
        absorb(s, bi, o);
    }
    o = s->b[bi].next;
    if (o >= 0 && !s->b[o].allocated && s->b[o].mapped) {
        pool_remove(s, o);
        absorb(s, bi, o);
    }
    pool_add(s, bi);
    return bi;
}

/* CachingAllocator._chain */
static int32_t chain(Sim *s, int small) {
    if (s->chains[small] < 0) {
        s->chains[small] = new_block(s, address(s, UNBOUNDED), UNBOUNDED, small, 0, 0);
    }
    return s->chains[small];
}

/* CachingAllocator._map */
/* Cut block `bi` after its first `size` bytes: the rest becomes a new free block (mapped or
 * not) linked after it in its segment; returns the new block's index, -1 when out of memory
 * (sim_malloc's split, and map_block's pages of an expandable segment). */
static int32_t split_block(Sim *s, int32_t bi, int64_t size, int small, int mapped) {
    int32_t r = new_block(s, s->b[bi].addr + size, s->b[bi].size - size, small, 0, mapped);
    if (r < 0) {
        return -1;
    }
    Block *b = &s->b[bi];
    s->b[r].next = b->next;
    if (b->next >= 0) {
        s->b[b->next].prev = r;
    }
    s->b[r].prev = bi;
    b->next = r;
    b->size = size;
    return r;
}

static int32_t map_block(Sim *s, int32_t bi, int64_t size) {
    int small = s->b[bi].small;
    int64_t page = small ? SMALL_BUFFER : LARGE_BUFFER;
    int64_t bsize = s->b[bi].size;
    size = page * ((size + page - 1) / page);
    if (size > bsize) {
        size = bsize;
    }
    if (size < bsize && split_block(s, bi, size, small, 0) < 0) {
        return -1;
    }
    s->b[bi].mapped = 1;
    grow(s, size);
    return merge(s, bi);
}

/* CachingAllocator._expand */
static int32_t expand(Sim *s, int64_t size, int small) {
    int32_t bi = chain(s, small);
    while (bi >= 0) {
        const Block *b = &s->b[bi];
        int64_t room = 0;
        if (!b->mapped) {
            room = b->size;
            if (b->next >= 0 && s->b[b->next].mapped && !s->b[b->next].allocated) {
                room += s->b[b->next].size;
            }
        } else if (!b->allocated && b->next >= 0 && !s->b[b->next].mapped) {
            room = b->size + s->b[b->next].size;
        }
        if (room >= size) {
            break;
        }
        bi = b->next;
    }
    if (bi < 0) {
        return -1; /* unreachable: the chain ends in unbounded unmapped space */
    }
    if (!s->b[bi].mapped) {
        int64_t want = s->b[bi].size < size ? s->b[bi].size : size;
        bi = map_block(s, bi, want);
    }
    while (bi >= 0 && s->b[bi].size < size) {
        bi = map_block(s, s->b[bi].next, size - s->b[bi].size);
    }
    if (bi >= 0) {
        pool_remove(s, bi);
    }
    return bi;
}

/* CachingAllocator.malloc */
static int32_t sim_malloc(Sim *s, int64_t size) {
    size = size < MIN_BLOCK ? MIN_BLOCK : MIN_BLOCK * ((size + MIN_BLOCK - 1) / MIN_BLOCK);
    int small = size <= SMALL_SIZE;
    int32_t bi;
    int split;
    if (s->expandable) {
        bi = best_fit(s, small, size);
        if (bi >= 0) {
            pool_remove(s, bi);
        } else {
            bi = expand(s, size, small);
            if (bi < 0) {
                return -1;
            }
        }
        split = s->b[bi].size - size >= MIN_BLOCK;
    } else {
        Pool *p = &s->pools[small];
        Py_ssize_t i = lower_bound(p, size);
        if (i < p->n) {
            const Bucket *bk = &p->buckets[p->e[i].bucket];
            bi = bk->s[bk->n - 1].idx;
            pool_delete(p, i, bk->n - 1);
        } else {
            int64_t seg = allocation_size(size);
            bi = new_block(s, address(s, seg), seg, small, 0, 1);
            if (bi < 0) {
                return -1;
            }
            grow(s, seg);
        }
        int64_t rest = s->b[bi].size - size;
        split = small ? rest >= MIN_BLOCK : rest > SMALL_SIZE;
    }
    if (split) {
        int32_t r = split_block(s, bi, size, small, 1);
        if (r < 0) {
            return -1;
        }
        pool_add(s, r);
    }
    s->b[bi].allocated = 1;
    s->allocated += s->b[bi].size;
    if (s->allocated > s->peak_allocated) {
        s->peak_allocated = s->allocated;
    }
    return bi;
}

/* CachingAllocator.free */
static int sim_free(Sim *s, int32_t bi) {
    Block *b = &s->b[bi];
    if (!b->allocated) {
        PyErr_SetString(PyExc_ValueError, "block freed twice");
        return -1;
    }
    b->allocated = 0;
    s->allocated -= b->size;
    merge(s, bi);
    return 0;
}

/* CachingAllocator._relink: `pieces` (in address order) where `old` was */
static void relink(Sim *s, int32_t old, const int32_t *pieces, int n) {
    int small = s->b[old].small;
    int32_t prev = s->b[old].prev, next = s->b[old].next;
    s->b[pieces[0]].prev = prev;
    if (prev >= 0) {
        s->b[prev].next = pieces[0];
    } else if (s->chains[small] == old) {
        s->chains[small] = pieces[0];
    }
    s->b[pieces[n - 1]].next = next;
    if (next >= 0) {
        s->b[next].prev = pieces[n - 1];
    }
    for (int k = 0; k + 1 < n; k++) {
        s->b[pieces[k]].next = pieces[k + 1];
        s->b[pieces[k + 1]].prev = pieces[k];
    }
}

/* CachingAllocator.empty_cache */
static int empty_cache(Sim *s) {
    for (int small = 1; small >= 0; small--) {
        Pool *p = &s->pools[small];
        if (p->n == 0) {
            continue;
        }
        Py_ssize_t n = 0;
        for (Py_ssize_t i = 0; i < p->n; i++) {
            n += p->buckets[p->e[i].bucket].n;
        }
        int32_t *snap = malloc((size_t)n * sizeof(int32_t));
        if (snap == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        n = 0;
        for (Py_ssize_t i = 0; i < p->n; i++) { /* (size, address) order */
            const Bucket *bk = &p->buckets[p->e[i].bucket];
            for (int32_t j = bk->n - 1; j >= 0; j--) {
                snap[n++] = bk->s[j].idx;
            }
        }
        for (Py_ssize_t k = 0; k < n; k++) {
            int32_t bi = snap[k];
            if (!s->expandable) {
                if (s->b[bi].prev < 0 && s->b[bi].next < 0) {
                    pool_remove(s, bi);
                    s->reserved -= s->b[bi].size;
                    drop_block(s, bi);
                }
                continue;
            }
            int64_t page = small ? SMALL_BUFFER : LARGE_BUFFER;
            int32_t head = chain(s, small);
            if (head < 0) {
                free(snap);
                PyErr_NoMemory();
                return -1;
            }
            int64_t base = s->b[head].addr;
            int64_t addr = s->b[bi].addr, end = addr + s->b[bi].size;
            int64_t lo = base + page * ((addr - base + page - 1) / page);
            int64_t hi = base + page * ((end - base) / page);
            if (hi <= lo) {
                continue;
            }
            pool_remove(s, bi);
            int32_t pieces[3];
            int np = 0, gap_at;
            if (lo > addr) {
                pieces[np++] = new_block(s, addr, lo - addr, small, 0, 1);
            }
            gap_at = np;
            pieces[np++] = new_block(s, lo, hi - lo, small, 0, 0);
            if (hi < end) {
                pieces[np++] = new_block(s, hi, end - hi, small, 0, 1);
            }
            if (s->oom) {
                free(snap);
                PyErr_NoMemory();
                return -1;
            }
            relink(s, bi, pieces, np);
            drop_block(s, bi);
            for (int q = 0; q < np; q++) {
                if (s->b[pieces[q]].mapped) {
                    pool_add(s, pieces[q]);
                }
            }
            s->reserved -= hi - lo;
            /* _merge_unmapped(gap) */
            int32_t gap = pieces[gap_at];
            int32_t prev = s->b[gap].prev, next = s->b[gap].next;
            if (prev >= 0 && !s->b[prev].mapped) {
                absorb(s, gap, prev);
            }
            if (next >= 0 && !s->b[next].mapped) {
                absorb(s, gap, next);
            }
        }
        free(snap);
    }
    return 0;
}

typedef struct {
    int64_t *id, *size;
    Py_ssize_t n;
} Requests;

static int alloc_requests(Requests *r, Py_ssize_t n) {
    r->n = n;
    r->id = malloc((size_t)(n + 1) * sizeof(int64_t));
    r->size = malloc((size_t)(n + 1) * sizeof(int64_t));
    if (r->id == NULL || r->size == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* a sequence of (id, bytes) tuples */
static int read_requests(PyObject *seq, Requests *r) {
    PyObject *fast = PySequence_Fast(seq, "requests must be a sequence of (id, bytes)");
    if (fast == NULL) {
        return -1;
    }
    if (alloc_requests(r, PySequence_Fast_GET_SIZE(fast)) < 0) {
        Py_DECREF(fast);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t k = 0; k < r->n; k++) {
        PyObject *t = items[k];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "a request is a tuple (id, bytes)");
            return -1;
        }
        r->id[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 0));
        r->size[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
        if (PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

static int int64_buffer(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    if (view->itemsize != 8 || view->format == NULL ||
        (strcmp(view->format, "q") != 0 && strcmp(view->format, "l") != 0)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "a block's ids, strides and sizes are int64 arrays");
        return -1;
    }
    return 0;
}

/* a sequence of blocks (ids, strides, sizes, count): allocator_replay.RequestBlock */
static int read_blocks(PyObject *seq, Requests *r) {
    PyObject *fast = PySequence_Fast(seq, "steps must be a sequence of request blocks");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Py_ssize_t total = 0;
    int rc = -1;
    for (int pass = 0; pass < 2; pass++) { /* count, then fill */
        Py_ssize_t at = 0;
        for (Py_ssize_t b = 0; b < nb; b++) {
            PyObject *t = items[b];
            if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
                PyErr_SetString(PyExc_TypeError,
                                "a request block is a tuple (ids, strides, sizes, count)");
                goto done;
            }
            Py_ssize_t count = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 3));
            if (count < 0) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_ValueError, "a block's count is negative");
                }
                goto done;
            }
            Py_buffer v[3];
            int got = 0;
            for (; got < 3; got++) {
                if (int64_buffer(PyTuple_GET_ITEM(t, got), &v[got]) < 0) {
                    break;
                }
            }
            if (got < 3 || v[1].len != v[0].len || v[2].len != v[0].len) {
                for (int q = 0; q < got; q++) {
                    PyBuffer_Release(&v[q]);
                }
                if (got == 3) {
                    PyErr_SetString(PyExc_ValueError,
                                    "a block's ids, strides and sizes differ in length");
                }
                goto done;
            }
            Py_ssize_t len = v[0].len / 8;
            if (pass == 0) {
                total += len * count;
            } else {
                const int64_t *ids = v[0].buf, *strides = v[1].buf, *sizes = v[2].buf;
                for (Py_ssize_t c = 0; c < count; c++) {
                    for (Py_ssize_t k = 0; k < len; k++) {
                        r->id[at] = ids[k] + (int64_t)c * strides[k];
                        r->size[at] = sizes[k];
                        at++;
                    }
                }
            }
            for (int q = 0; q < 3; q++) {
                PyBuffer_Release(&v[q]);
            }
        }
        if (pass == 0 && alloc_requests(r, total) < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    Py_DECREF(fast);
    return rc;
}

typedef struct { /* tensor id -> block, over a dense range of ids */
    int32_t *slot; /* -1: not live */
    int64_t *req;  /* the live tensor's rounded request (round_size) */
    int64_t lo;
    Py_ssize_t n;
} Live;

/* replay_requests over r[from:to] */
static int replay(Sim *s, Live *live, const Requests *r, Py_ssize_t from, Py_ssize_t to) {
    for (Py_ssize_t k = from; k < to; k++) {
        int64_t size = r->size[k];
        if (size < 0) {
            if (empty_cache(s) < 0) {
                return -1;
            }
            continue;
        }
        int32_t *slot = &live->slot[r->id[k] - live->lo];
        if (size > 0) {
            int32_t b = sim_malloc(s, size);
            if (b < 0) {
                PyErr_NoMemory();
                return -1;
            }
            *slot = b;
            int64_t rounded = size < 512 ? 512 : ((size + 511) / 512) * 512;
            live->req[r->id[k] - live->lo] = rounded;
            s->requested += rounded;
            if (s->requested > s->peak_requested) {
                s->peak_requested = s->requested;
            }
        } else {
            if (*slot < 0) {
                PyErr_Format(PyExc_KeyError, "free of tensor %lld, which is not live",
                             (long long)r->id[k]);
                return -1;
            }
            if (sim_free(s, *slot) < 0) {
                return -1;
            }
            *slot = -1;
            s->requested -= live->req[r->id[k] - live->lo];
        }
        if (s->oom) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void id_range(const Requests *r, int64_t *lo, int64_t *hi) {
    for (Py_ssize_t k = 0; k < r->n; k++) {
        if (r->size[k] < 0) {
            continue;
        }
        if (r->id[k] < *lo) {
            *lo = r->id[k];
        }
        if (r->id[k] > *hi) {
            *hi = r->id[k];
        }
    }
}

/* After id_range over n requests: an empty range becomes [0, 0]; whether the ids are a
 * dense range, as the programs' counters make them (load_requests, step_requests), so that
 * a table indexed by id - lo stays small. */
static int dense_ids(int64_t *lo, int64_t *hi, Py_ssize_t n) {
    if (*lo > *hi) {
        *lo = *hi = 0;
    }
    return *hi - *lo <= 16 * (int64_t)n + 1024;
}

static PyObject *replay_program(PyObject *self, PyObject *args) {
    PyObject *load_seq, *steps_seq, *bounds_seq;
    int expandable, descending = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOp|p", &load_seq, &steps_seq, &bounds_seq, &expandable,
                          &descending)) {
        return NULL;
    }
    Requests load = {0}, steps = {0};
    Sim s;
    memset(&s, 0, sizeof s);
    s.expandable = expandable;
    s.chains[0] = s.chains[1] = -1;
    s.next_addr = SEGMENT_GAP;
    s.descending = descending;
    s.next_down = 1ULL << 63;
    Live live = {0};
    PyObject *bounds = NULL, *result = NULL, *peaks = NULL, *req_peaks = NULL;
    if (read_requests(load_seq, &load) < 0 || read_blocks(steps_seq, &steps) < 0) {
        goto done;
    }
    bounds = PySequence_Fast(bounds_seq, "bounds must be a sequence of ints");
    if (bounds == NULL) {
        goto done;
    }
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    id_range(&load, &lo, &hi);
    id_range(&steps, &lo, &hi);
    if (!dense_ids(&lo, &hi, load.n + steps.n)) {
        PyErr_SetString(PyExc_ValueError, "tensor ids are not a dense range");
        goto done;
    }
    live.lo = lo;
    live.n = (Py_ssize_t)(hi - lo + 1);
    live.slot = malloc((size_t)live.n * sizeof(int32_t));
    live.req = malloc((size_t)live.n * sizeof(int64_t));
    if (live.slot == NULL || live.req == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memset(live.slot, 0xff, (size_t)live.n * sizeof(int32_t));
    if (replay(&s, &live, &load, 0, load.n) < 0) {
        goto done;
    }
    int64_t load_alloc = s.peak_allocated, load_reserved = s.peak_reserved;
    int64_t load_requested = s.peak_requested;
    /* the measured peaks start at training */
    s.peak_reserved = s.reserved;
    s.peak_allocated = s.allocated;
    int64_t overall = s.peak_allocated;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(bounds);
    peaks = PyTuple_New(nb);
    req_peaks = PyTuple_New(nb);
    if (peaks == NULL || req_peaks == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < nb; k++) {
        Py_ssize_t from = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(bounds, k));
        Py_ssize_t to = k + 1 < nb ? PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(bounds, k + 1))
                                   : steps.n;
        if (PyErr_Occurred()) {
            goto done;
        }
        if (from < 0 || to > steps.n || from > to) {
            PyErr_SetString(PyExc_ValueError, "bounds must increase inside the requests");
            goto done;
        }
        s.peak_allocated = s.allocated;
        s.peak_requested = s.requested;
        if (replay(&s, &live, &steps, from, to) < 0) {
            goto done;
        }
        PyObject *v = PyLong_FromLongLong(s.peak_allocated);
        if (v == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(peaks, k, v);
        v = PyLong_FromLongLong(s.peak_requested);
        if (v == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(req_peaks, k, v);
        if (s.peak_allocated > overall) {
            overall = s.peak_allocated;
        }
    }
    result = Py_BuildValue("LLOLLLO", (long long)load_alloc, (long long)load_reserved, peaks,
                           (long long)overall, (long long)s.peak_reserved,
                           (long long)load_requested, req_peaks);
done:
    Py_XDECREF(peaks);
    Py_XDECREF(req_peaks);
    Py_XDECREF(bounds);
    free(load.id);
    free(load.size);
    free(steps.id);
    free(steps.size);
    free(live.slot);
    free(live.req);
    free(s.b);
    free(s.spare);
    for (int q = 0; q < 2; q++) {
        for (int32_t k = 0; k < s.pools[q].nb; k++) {
            free(s.pools[q].buckets[k].s);
        }
        free(s.pools[q].buckets);
        free(s.pools[q].e);
        free(s.pools[q].spare);
    }
    return result;
}

/* owners(requests, starts) -> (runs, offsets) or None: program.templates._shape's pass
 * over a cut's requests (its pure-Python loop there does the same). `requests`: (id,
 * bytes) tuples; `starts`: the first request of each run, ascending from 0. For each
 * request, two int64s (native order, as array("q") reads them): an allocation (bytes >
 * 0) gives run -2 and its offset, its index among its run's allocations; a free (bytes 0)
 * gives the run and offset of the last allocation of its id before it, run -1 where none;
 * an empty_cache (bytes < 0) run -1. None where the ids are not a dense range. */
static PyObject *owners(PyObject *self, PyObject *args) {
    PyObject *req_seq, *starts_seq;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &req_seq, &starts_seq)) {
        return NULL;
    }
    Requests r = {0};
    PyObject *starts = NULL, *runs = NULL, *offsets = NULL, *result = NULL;
    int64_t *own_run = NULL, *own_off = NULL;
    if (read_requests(req_seq, &r) < 0) {
        goto done;
    }
    starts = PySequence_Fast(starts_seq, "starts must be a sequence of ints");
    if (starts == NULL) {
        goto done;
    }
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    id_range(&r, &lo, &hi);
    if (!dense_ids(&lo, &hi, r.n)) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    Py_ssize_t span = (Py_ssize_t)(hi - lo + 1);
    own_run = malloc((size_t)span * sizeof(int64_t));
    own_off = malloc((size_t)span * sizeof(int64_t));
    runs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(r.n * 8));
    offsets = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(r.n * 8));
    if (own_run == NULL || own_off == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (runs == NULL || offsets == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < span; k++) {
        own_run[k] = -1;
        own_off[k] = 0;
    }
    int64_t *out_run = (int64_t *)PyBytes_AS_STRING(runs);
    int64_t *out_off = (int64_t *)PyBytes_AS_STRING(offsets);
    Py_ssize_t nstarts = PySequence_Fast_GET_SIZE(starts);
    Py_ssize_t run = -1, next = 0; /* the run of request k; the next run's index */
    int64_t next_start = 0, local = 0;
    if (nstarts > 0) {
        next_start = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(starts, 0));
        if (PyErr_Occurred()) {
            goto done;
        }
    } else {
        next_start = INT64_MAX;
    }
    for (Py_ssize_t k = 0; k < r.n; k++) {
        while (next_start <= k) { /* (an empty run starts where the next one does) */
            run = next++;
            local = 0;
            if (next < nstarts) {
                next_start = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(starts, next));
                if (PyErr_Occurred()) {
                    goto done;
                }
            } else {
                next_start = INT64_MAX;
            }
        }
        int64_t size = r.size[k];
        if (size > 0) {
            own_run[r.id[k] - lo] = run;
            own_off[r.id[k] - lo] = local;
            out_run[k] = -2;
            out_off[k] = local++;
        } else if (size == 0) {
            out_run[k] = own_run[r.id[k] - lo];
            out_off[k] = own_off[r.id[k] - lo];
        } else {
            out_run[k] = -1;
            out_off[k] = 0;
        }
    }
    result = PyTuple_Pack(2, runs, offsets);
done:
    Py_XDECREF(starts);
    Py_XDECREF(runs);
    Py_XDECREF(offsets);
    free(own_run);
    free(own_off);
    free(r.id);
    free(r.size);
    return result;
}

/* span_changes(requests, spans) -> [(change, top), ...] or None: program.step.
 * requested_peak's pass over a cut's requests (its pure-Python comprehensions there do the
 * same). Each request changes the rounded requested bytes alive (replay.requested_run): an
 * allocation (bytes > 0) by its round_size, a free (bytes 0) by minus its tensor's, an
 * empty_cache (bytes < 0) by 0. For each span (lo, hi) of the requests: the sum of the
 * changes of requests lo..hi-1 and the largest of their running sums (0 for an empty span).
 * None where the ids are not a dense range or a free's tensor was never allocated. */
static PyObject *span_changes(PyObject *self, PyObject *args) {
    PyObject *req_seq, *spans_seq;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &req_seq, &spans_seq)) {
        return NULL;
    }
    Requests r = {0};
    PyObject *spans = NULL, *out = NULL, *result = NULL;
    int64_t *rounded = NULL, *delta = NULL;
    if (read_requests(req_seq, &r) < 0) {
        goto done;
    }
    spans = PySequence_Fast(spans_seq, "spans must be a sequence of (lo, hi)");
    if (spans == NULL) {
        goto done;
    }
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    id_range(&r, &lo, &hi);
    if (!dense_ids(&lo, &hi, r.n)) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    Py_ssize_t span = (Py_ssize_t)(hi - lo + 1);
    rounded = calloc((size_t)span, sizeof(int64_t));
    delta = malloc((size_t)(r.n + 1) * sizeof(int64_t));
    if (rounded == NULL || delta == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < r.n; k++) {
        int64_t size = r.size[k];
        if (size > 0) {
            int64_t v = size < 512 ? 512 : ((size + 511) / 512) * 512;
            rounded[r.id[k] - lo] = v;
            delta[k] = v;
        } else if (size == 0) {
            if (rounded[r.id[k] - lo] == 0) {
                result = Py_None;
                Py_INCREF(result);
                goto done;
            }
            delta[k] = -rounded[r.id[k] - lo];
        } else {
            delta[k] = 0;
        }
    }
    Py_ssize_t ns = PySequence_Fast_GET_SIZE(spans);
    out = PyList_New(ns);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t j = 0; j < ns; j++) {
        Py_ssize_t a, b;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(spans, j), "nn", &a, &b)) {
            goto done;
        }
        if (a < 0 || b > r.n || a > b) {
            PyErr_SetString(PyExc_ValueError, "a span must lie inside the requests");
            goto done;
        }
        int64_t run = 0, top = 0;
        for (Py_ssize_t k = a; k < b; k++) {
            run += delta[k];
            if (k == a || run > top) {
                top = run;
            }
        }
        PyObject *t = Py_BuildValue("LL", (long long)run, (long long)top);
        if (t == NULL) {
            goto done;
        }
        PyList_SET_ITEM(out, j, t);
    }
    result = out;
    out = NULL;
done:
    Py_XDECREF(spans);
    Py_XDECREF(out);
    free(rounded);
    free(delta);
    free(r.id);
    free(r.size);
    return result;
}

static PyMethodDef methods[] = {
    {"replay_program", replay_program, METH_VARARGS,
     "replay_program(load, steps, bounds, expandable, descending=False) -> (load peak "
     "allocated, load peak reserved, peak allocated of each step segment, peak "
     "allocated over the steps, peak reserved over the steps, load peak requested, peak "
     "requested of each step segment); "
     "requested: the rounded request bytes alive (step_requests.requested_peaks); "
     "`load` (id, bytes) tuples, `steps` request blocks; see "
     "vramcalc.memory.allocator.replay.replay_program."},
    {"owners", owners, METH_VARARGS,
     "owners(requests, starts) -> (runs, offsets) as int64 bytes, or None: the owner of "
     "each request's tensor (run -2: an allocation, its offset; -1: none); see "
     "vramcalc.memory.program.templates._shape."},
    {"span_changes", span_changes, METH_VARARGS,
     "span_changes(requests, spans) -> [(change, top)] or None: for each span (lo, hi) "
     "the change of the rounded requested bytes alive over its requests and the largest "
     "running sum; see vramcalc.memory.program.step.requested_peak."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vramcalc.memory.allocator._replay",
    "Compiled replay of a request program on the simulated caching allocator.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__replay(void) { return PyModule_Create(&module); }
