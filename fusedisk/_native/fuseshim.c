/*
 * fusedisk's shim between pyfuse3 and libfuse 3 (see fusedisk/fuseshim.py).
 *
 * pyfuse3 3.5 drops the flags of a FUSE WRITE request before it calls the
 * Python handler: only the file handle, offset and data reach it. The flags
 * carry O_DSYNC/O_SYNC for a write made with RWF_DSYNC/RWF_SYNC (and for
 * every write of a descriptor opened with them), and on a direct_io handle
 * the kernel sends no FSYNC afterwards, so the daemon must sync itself.
 *
 * This library defines fuse_session_new(). Loaded with RTLD_GLOBAL before
 * pyfuse3, it is found before libfuse's, copies pyfuse3's table of low-level
 * operations, puts a wrapper in front of write/write_buf and calls libfuse's
 * own fuse_session_new with the copy. The wrapper passes the sync flags in
 * two high bits of the file handle (fusedisk's handles are small counters)
 * and changes nothing else. Nothing here is called per request except the
 * two wrappers, which copy one struct and call on.
 *
 * pyfuse3 3.5 has no fallocate, lseek or copy_file_range handlers. When
 * fusedisk asks for them (fusedisk_shim_enable_extra, before the session is
 * made), the copy of the table gets handlers that touch no Python: each one
 * queues the request (a small struct, under a mutex) and signals an eventfd.
 * A trio task of the daemon waits on that eventfd, takes the requests with
 * fusedisk_shim_take and answers each with one of the reply functions below,
 * exactly once. So these requests are served on the trio loop like every
 * other, whichever thread libfuse calls the handlers on.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <fcntl.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define FH_SYNC_DATA (UINT64_C(1) << 61)
#define FH_SYNC_FULL (UINT64_C(1) << 62)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t, void *);

static struct fuse_lowlevel_ops wrapped_ops;
static void (*next_write)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t,
                          struct fuse_file_info *);
static void (*next_write_buf)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                              struct fuse_file_info *);

/* Sessions created through the wrapper; fusedisk reads it to prove it is in use. */
int fusedisk_shim_sessions;
/* Why the last fuse_session_new was passed through unwrapped (empty if it was not). */
const char *fusedisk_shim_error = "";

/* -- the handlers pyfuse3 lacks ------------------------------------------- */

enum { FUSEDISK_FALLOCATE = 1, FUSEDISK_LSEEK = 2, FUSEDISK_COPY_FILE_RANGE = 3 };

/* One queued request; fusedisk/fuseshim.py mirrors this layout. */
struct fusedisk_request {
    uint64_t req;        /* the fuse_req_t, to reply with */
    int32_t op;          /* FUSEDISK_* */
    int32_t mode;        /* fallocate mode, lseek whence */
    uint64_t fh;         /* file handle (the input's for copy_file_range) */
    int64_t offset;      /* fallocate/lseek offset, copy input offset */
    int64_t length;      /* fallocate length, copy length */
    uint64_t fh_out;     /* copy_file_range: output handle, offset, flags */
    int64_t offset_out;
    uint64_t flags;
};

struct queued {
    struct fusedisk_request r;
    struct queued *next;
};

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static struct queued *queue_head, *queue_tail;
static int extra_wanted;
/* The eventfd the daemon waits on; -1 while the extra handlers are not registered. */
int fusedisk_shim_eventfd = -1;
/* Requests queued by the extra handlers, by op (index FUSEDISK_*). */
unsigned long fusedisk_shim_queued[4];

void fusedisk_shim_enable_extra(int enable)
{
    extra_wanted = enable;
}

static void enqueue(const struct fusedisk_request *r)
{
    struct queued *q = malloc(sizeof(*q));
    if (q == NULL) {
        fuse_reply_err((fuse_req_t)(uintptr_t)r->req, ENOMEM);
        return;
    }
    q->r = *r;
    q->next = NULL;
    pthread_mutex_lock(&queue_lock);
    if (queue_tail != NULL)
        queue_tail->next = q;
    else
        queue_head = q;
    queue_tail = q;
    fusedisk_shim_queued[r->op]++;
    pthread_mutex_unlock(&queue_lock);
    uint64_t one = 1;
    /* cannot fail short of a counter overflow; the daemon drains it on each wake-up */
    (void)!write(fusedisk_shim_eventfd, &one, sizeof(one));
}

/* Move the oldest queued request into *out; 0 when none is left. */
int fusedisk_shim_take(struct fusedisk_request *out)
{
    pthread_mutex_lock(&queue_lock);
    struct queued *q = queue_head;
    if (q != NULL) {
        queue_head = q->next;
        if (queue_head == NULL)
            queue_tail = NULL;
    }
    pthread_mutex_unlock(&queue_lock);
    if (q == NULL)
        return 0;
    *out = q->r;
    free(q);
    return 1;
}

int fusedisk_shim_reply_err(uint64_t req, int err)
{
    return fuse_reply_err((fuse_req_t)(uintptr_t)req, err);
}

int fusedisk_shim_reply_lseek(uint64_t req, int64_t offset)
{
    return fuse_reply_lseek((fuse_req_t)(uintptr_t)req, (off_t)offset);
}

int fusedisk_shim_reply_write(uint64_t req, uint64_t count)
{
    return fuse_reply_write((fuse_req_t)(uintptr_t)req, (size_t)count);
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    (void)ino;
    struct fusedisk_request r = {.req = (uintptr_t)req, .op = FUSEDISK_FALLOCATE, .mode = mode,
                                 .fh = fi->fh, .offset = offset, .length = length};
    enqueue(&r);
}

static void shim_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    (void)ino;
    struct fusedisk_request r = {.req = (uintptr_t)req, .op = FUSEDISK_LSEEK, .mode = whence,
                                 .fh = fi->fh, .offset = off};
    enqueue(&r);
}

static void shim_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
                                 struct fuse_file_info *fi_in, fuse_ino_t ino_out, off_t off_out,
                                 struct fuse_file_info *fi_out, size_t len, int flags)
{
    (void)ino_in;
    (void)ino_out;
    struct fusedisk_request r = {.req = (uintptr_t)req, .op = FUSEDISK_COPY_FILE_RANGE,
                                 .fh = fi_in->fh, .offset = off_in, .length = (int64_t)len,
                                 .fh_out = fi_out->fh, .offset_out = off_out,
                                 .flags = (uint64_t)(unsigned)flags};
    enqueue(&r);
}

/* -- the write wrappers ---------------------------------------------------- */

static uint64_t sync_bits(int flags)
{
    if ((flags & O_SYNC) == O_SYNC)
        return FH_SYNC_FULL;
    if (flags & O_DSYNC)
        return FH_SYNC_DATA;
    return 0;
}

static void shim_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    copy.fh |= sync_bits(fi->flags);
    next_write(req, ino, buf, size, off, &copy);
}

static void shim_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    copy.fh |= sync_bits(fi->flags);
    next_write_buf(req, ino, bufv, off, &copy);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    /* pyfuse3 has loaded libfuse by now; ask it for the real one by name and
     * version, whatever order the loader put the libraries in. */
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    session_new_fn real = NULL;
    if (libfuse != NULL) {
        real = (session_new_fn)dlvsym(libfuse, "fuse_session_new", "FUSE_3.0");
        dlclose(libfuse); /* NOLOAD took a reference; pyfuse3 keeps its own */
    }
    if (real == NULL || real == fuse_session_new) {
        real = NULL;
        fusedisk_shim_error = "libfuse's fuse_session_new was not found behind the shim";
        return NULL;
    }
    if (op_size > sizeof(wrapped_ops)) {
        fusedisk_shim_error = "pyfuse3 was built against a newer libfuse than the shim";
        return real(args, op, op_size, userdata);
    }
    memset(&wrapped_ops, 0, sizeof(wrapped_ops));
    memcpy(&wrapped_ops, op, op_size);
    next_write = wrapped_ops.write;
    next_write_buf = wrapped_ops.write_buf;
    if (next_write != NULL)
        wrapped_ops.write = shim_write;
    if (next_write_buf != NULL)
        wrapped_ops.write_buf = shim_write_buf;
    if (extra_wanted && fusedisk_shim_eventfd < 0)
        fusedisk_shim_eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (extra_wanted && fusedisk_shim_eventfd >= 0) {
        wrapped_ops.fallocate = shim_fallocate;
        wrapped_ops.copy_file_range = shim_copy_file_range;
        wrapped_ops.lseek = shim_lseek;
        /* the copy is a whole table of the libfuse this was built against (zeroed
         * past pyfuse3's part), so libfuse may read all of it */
        op_size = sizeof(wrapped_ops);
    }
    fusedisk_shim_error = "";
    fusedisk_shim_sessions++;
    return real(args, &wrapped_ops, op_size, userdata);
}
