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
 *
 * FSYNC off the trio loop (fusedisk_shim_enable_fast_fsync). A guest's FSYNC
 * holds the kernel's inode lock until it is answered, so every other write to
 * the file waits for it: its reply must not wait for the trio loop to come
 * round. The shim's fsync wrapper numbers each FSYNC and passes the number in
 * bits FH_TOKEN_SHIFT.. of the handle. fusedisk's handler, when the file needs
 * nothing but the backing fsync, calls fusedisk_shim_detach_fsync with that
 * number, the backing fd and a cookie, and returns at once. pyfuse3 then
 * answers the request with fuse_reply_err(req, 0), which this library also
 * defines (it is found before libfuse's, like fuse_session_new): for the
 * detached request that reply is not sent but is the signal to hand the fsync
 * to one of the shim's threads, which runs fsync/fdatasync and answers the
 * kernel itself, with the call's errno if it failed. Once the call returned,
 * a completion is queued (op FUSEDISK_FSYNC_DONE, the cookie in fh) for the
 * daemon, which keeps the file's fd open and its entry's gate entered until
 * it has seen it. No other request's reply is touched. The same threads run
 * write-behind: sync_file_range(SYNC_FILE_RANGE_WRITE) of a file the daemon
 * names (fusedisk_shim_write_behind), so that an fsync finds little to write.
 *
 * Parallel direct writes (fusedisk_shim_enable_parallel_writes). libfuse 3.14
 * has no field for FOPEN_PARALLEL_DIRECT_WRITES; without it the kernel takes
 * the inode lock exclusively for each direct write. This library also defines
 * fuse_reply_open: for a direct_io handle it builds the fuse_open_out reply of
 * the kernel protocol (linux/fuse.h) itself, with that flag added, and sends
 * it with fuse_reply_buf. Other opens go to libfuse's. *
 * FUSE_HANDLE_KILLPRIV_V2 (fusedisk_shim_enable_killpriv). Without it the kernel
 * asks for security.capability before every buffered write, and refreshes the
 * attributes before every chown. With it the kernel marks the superblock
 * SB_NOSEC: a file found without capabilities is not asked again until its
 * mode or security xattrs change, and the filesystem kills set-uid/set-gid
 * itself, told by a flag in the request (FUSE_WRITE_KILL_SUIDGID on a write,
 * FATTR_KILL_SUIDGID on a setattr, FUSE_OPEN_KILL_SUIDGID on an open with
 * O_TRUNC) when the caller lacks CAP_FSETID. libfuse 3.14 knows neither the
 * INIT flag nor these request flags (it drops them). So the session gets a
 * custom I/O (fuse_session_custom_io, plain read/writev of the same fd): its
 * read notes the flags of each request as it arrives, and the wrappers, which
 * libfuse calls for that request before the next is read, hand them on: a
 * write's and a setattr's in FH_KILL_SUIDGID of the handle (a setattr without
 * a handle gets one made of that bit alone), an open's or create's in
 * OPEN_KILL_SUIDGID of the flags. Its writev adds FUSE_HANDLE_KILLPRIV_V2 to
 * libfuse's INIT reply when the kernel offered it. Capabilities stay the
 * kernel's: it still removes them itself (setattr_prepare, file_remove_privs),
 * now only while the file is not known to have none.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <fcntl.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stddef.h>
#include <sys/uio.h>

#define FH_SYNC_DATA (UINT64_C(1) << 61)
#define FH_SYNC_FULL (UINT64_C(1) << 62)
/* An FSYNC's number (fuseshim.py FH_TOKEN_*): below the snapshot view's handles
 * (1 << 60), above fusedisk's own counters. */
#define FH_TOKEN_SHIFT 40
#define FH_TOKEN_MASK ((UINT64_C(1) << 20) - 1)
/* The caller of a write or setattr lacks CAP_FSETID: kill set-uid/set-gid
 * (fuseshim.py FH_KILL_SUIDGID). */
#define FH_KILL_SUIDGID (UINT64_C(1) << 63)
/* The same for an open or create (O_TRUNC), in its flags (fuseshim.py OPEN_KILL_SUIDGID). */
#define OPEN_KILL_SUIDGID (1 << 30)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t, void *);

static struct fuse_lowlevel_ops wrapped_ops;
static void (*next_write)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t,
                          struct fuse_file_info *);
static void (*next_write_buf)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                              struct fuse_file_info *);
static void (*next_fsync)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
static void (*next_init)(void *, struct fuse_conn_info *);
static void (*next_setattr)(fuse_req_t, fuse_ino_t, struct stat *, int, struct fuse_file_info *);
static void (*next_open)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*next_create)(fuse_req_t, fuse_ino_t, const char *, mode_t, struct fuse_file_info *);

/* Sessions created through the wrapper; fusedisk reads it to prove it is in use. */
int fusedisk_shim_sessions;
/* Why the last fuse_session_new was passed through unwrapped (empty if it was not). */
const char *fusedisk_shim_error = "";

/* -- the handlers pyfuse3 lacks ------------------------------------------- */

enum { FUSEDISK_FALLOCATE = 1, FUSEDISK_LSEEK = 2, FUSEDISK_COPY_FILE_RANGE = 3,
       FUSEDISK_FSYNC_DONE = 4 };

/* One queued request; fusedisk/fuseshim.py mirrors this layout. */
struct fusedisk_request {
    uint64_t req;        /* the fuse_req_t, to reply with */
    int32_t op;          /* FUSEDISK_* */
    int32_t mode;        /* fallocate mode, lseek whence; FSYNC_DONE: the errno (0: synced) */
    uint64_t fh;         /* file handle (the input's for copy_file_range); FSYNC_DONE: cookie */
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
unsigned long fusedisk_shim_queued[5];

void fusedisk_shim_enable_extra(int enable)
{
    extra_wanted = enable;
}

/* Queue *q (its r filled in) for the daemon and signal the eventfd. Any thread. */
static void push(struct queued *q)
{
    q->next = NULL;
    pthread_mutex_lock(&queue_lock);
    if (queue_tail != NULL)
        queue_tail->next = q;
    else
        queue_head = q;
    queue_tail = q;
    fusedisk_shim_queued[q->r.op]++;
    pthread_mutex_unlock(&queue_lock);
    uint64_t one = 1;
    /* cannot fail short of a counter overflow; the daemon drains it on each wake-up */
    (void)!write(fusedisk_shim_eventfd, &one, sizeof(one));
}

static void enqueue(const struct fusedisk_request *r)
{
    struct queued *q = malloc(sizeof(*q));
    if (q == NULL) {
        fuse_reply_err((fuse_req_t)(uintptr_t)r->req, ENOMEM);
        return;
    }
    q->r = *r;
    push(q);
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

/* -- libfuse's reply functions, and the two this library puts before them ---- */

static int (*real_reply_err)(fuse_req_t, int);
static int (*real_reply_open)(fuse_req_t, const struct fuse_file_info *);

static void *libfuse_symbol(const char *name)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    void *found = NULL;
    if (libfuse != NULL) {
        found = dlvsym(libfuse, name, "FUSE_3.0");
        dlclose(libfuse); /* NOLOAD took a reference; pyfuse3 keeps its own */
    }
    return found;
}

/* libfuse's fuse_reply_err and fuse_reply_open; 0 if either is missing. */
static int resolve_replies(void)
{
    if (real_reply_err == NULL)
        real_reply_err = (int (*)(fuse_req_t, int))libfuse_symbol("fuse_reply_err");
    if (real_reply_open == NULL)
        real_reply_open = (int (*)(fuse_req_t, const struct fuse_file_info *))libfuse_symbol(
            "fuse_reply_open");
    return real_reply_err != NULL && real_reply_err != fuse_reply_err &&
           real_reply_open != NULL && real_reply_open != fuse_reply_open;
}

/* -- FSYNC and write-behind on the shim's threads ---------------------------- */

enum { JOB_FSYNC = 1, JOB_WRITE_BEHIND = 2 };

struct job {
    /* first: the completion queued for the daemon, which fusedisk_shim_take frees
     * (so the job is freed with it); preallocated, so it cannot fail to be queued */
    struct queued done;
    struct job *next;
    int kind;
    int fd;
    int datasync;
    fuse_req_t req;
};

static int fast_fsync_wanted, parallel_writes_wanted;
/* The FSYNC whose handler is running now (trio thread only), and its number. */
static fuse_req_t current_fsync;
static uint64_t current_token;
/* The detached FSYNC, waiting for pyfuse3's reply to go to a thread (trio thread only). */
static struct job *detached;

static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t jobs_ready = PTHREAD_COND_INITIALIZER;
struct job_queue {
    struct job *head, *tail;
};
static struct job_queue fsync_jobs, write_behind_jobs;
static int threads, idle_threads;
/* detached FSYNCs not answered yet (fusedisk_shim_drain waits for none) */
static int fsyncs_in_flight;
static pthread_cond_t fsyncs_drained = PTHREAD_COND_INITIALIZER;
#define MAX_THREADS 8
/* fds with a write-behind queued or running (a small set: one per busy file), so
 * that a slow one does not pile up threads that FSYNCs need */
#define MAX_WRITE_BEHIND 64
static int write_behind_fds[MAX_WRITE_BEHIND];
static int write_behind_queued;

/* Counters (fuseshim.statistics): FSYNCs handed to the shim's threads, of
 * those failed, write-behinds run and write-behinds skipped (one was queued). */
unsigned long fusedisk_shim_fsyncs, fusedisk_shim_fsync_errors;
unsigned long fusedisk_shim_write_behinds, fusedisk_shim_write_behinds_merged;
/* Opens answered with FOPEN_PARALLEL_DIRECT_WRITES. */
unsigned long fusedisk_shim_parallel_opens;

void fusedisk_shim_enable_fast_fsync(int enable)
{
    fast_fsync_wanted = enable;
}

void fusedisk_shim_enable_parallel_writes(int enable)
{
    parallel_writes_wanted = enable;
}

/* FUSEDISK_STALL=shim-fsync:MS:COUNT (failpoint.py's stall points): the first
 * COUNT detached FSYNCs wait MS milliseconds on their thread before the fsync. */
static long stall_fsync_ms;
static long stall_fsync_left;

static void read_stall(void)
{
    const char *spec = getenv("FUSEDISK_STALL");
    const char *name = "shim-fsync:";
    if (spec == NULL || strncmp(spec, name, strlen(name)) != 0)
        return;
    char *end;
    long ms = strtol(spec + strlen(name), &end, 10);
    long count = *end == ':' ? strtol(end + 1, NULL, 10) : 1;
    if (ms > 0 && count > 0) {
        stall_fsync_left = count;
        stall_fsync_ms = ms;
    }
}

static void forget_write_behind(int fd)
{
    pthread_mutex_lock(&jobs_lock);
    for (int i = 0; i < write_behind_queued; i++) {
        if (write_behind_fds[i] == fd) {
            write_behind_fds[i] = write_behind_fds[--write_behind_queued];
            break;
        }
    }
    pthread_mutex_unlock(&jobs_lock);
}

static void run_job(struct job *j)
{
    if (j->kind == JOB_WRITE_BEHIND) {
        /* only starts writeback: on an fd that was closed and reused meanwhile it
         * does no harm, so the daemon need not keep it open for us */
        (void)sync_file_range(j->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        forget_write_behind(j->fd);
        __atomic_add_fetch(&fusedisk_shim_write_behinds, 1, __ATOMIC_RELAXED);
        free(j);
        return;
    }
    if (stall_fsync_ms > 0 && __atomic_sub_fetch(&stall_fsync_left, 1, __ATOMIC_RELAXED) >= 0)
        usleep((useconds_t)stall_fsync_ms * 1000);
    int err = (j->datasync ? fdatasync(j->fd) : fsync(j->fd)) == 0 ? 0 : errno;
    if (err)
        __atomic_add_fetch(&fusedisk_shim_fsync_errors, 1, __ATOMIC_RELAXED);
    fuse_req_t req = j->req;
    /* The fd is done with: until the daemon sees this it keeps the fd and the gate.
     * Queued before the reply, so the daemon's wake-up for it is not in the way of
     * the guest's next request, which the reply lets go. */
    j->done.r.mode = err;
    push(&j->done); /* the daemon frees the job (fusedisk_shim_take): j is gone */
    real_reply_err(req, err);
    pthread_mutex_lock(&jobs_lock);
    if (--fsyncs_in_flight == 0)
        pthread_cond_broadcast(&fsyncs_drained);
    pthread_mutex_unlock(&jobs_lock);
}

static void queue_job(struct job_queue *q, struct job *j)
{
    j->next = NULL;
    if (q->tail != NULL)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
}

static struct job *pop_job(struct job_queue *q)
{
    struct job *j = q->head;
    if (j != NULL) {
        q->head = j->next;
        if (q->head == NULL)
            q->tail = NULL;
    }
    return j;
}

static void *serve_jobs(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&jobs_lock);
    for (;;) {
        struct job *j;
        /* FSYNCs first: a guest waits for each one, and holds the file's writes */
        while ((j = pop_job(&fsync_jobs)) == NULL && (j = pop_job(&write_behind_jobs)) == NULL) {
            idle_threads++;
            pthread_cond_wait(&jobs_ready, &jobs_lock);
            idle_threads--;
        }
        pthread_mutex_unlock(&jobs_lock);
        run_job(j);
        pthread_mutex_lock(&jobs_lock);
    }
    return NULL;
}

/* Queue a job for the threads (a new thread while none is idle, up to MAX_THREADS);
 * with no thread at all, run it on the caller's. */
static void submit(struct job *j)
{
    struct job_queue *q = j->kind == JOB_FSYNC ? &fsync_jobs : &write_behind_jobs;
    pthread_mutex_lock(&jobs_lock);
    queue_job(q, j);
    if (j->kind == JOB_FSYNC)
        fsyncs_in_flight++;
    if (idle_threads == 0 && threads < MAX_THREADS) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        if (pthread_create(&thread, &attr, serve_jobs, NULL) == 0)
            threads++;
        pthread_attr_destroy(&attr);
    } else {
        pthread_cond_signal(&jobs_ready);
    }
    /* no thread could be made, ever: every job ran here, so this one is alone */
    int alone = threads == 0;
    if (alone)
        pop_job(q);
    pthread_mutex_unlock(&jobs_lock);
    if (alone)
        run_job(j);
}

/* Called by the daemon's fsync handler, on the trio thread, with the number the
 * wrapper put in the handle: take the running FSYNC over (1) or not (0: the
 * number is not the running FSYNC's, fast fsync is off, or out of memory). After
 * a 1 the handler must return at once: pyfuse3's success reply starts the fsync. */
int fusedisk_shim_detach_fsync(uint64_t token, int fd, int datasync, uint64_t cookie)
{
    if (token == 0 || token != current_token || current_fsync == NULL || detached != NULL)
        return 0;
    struct job *j = calloc(1, sizeof(*j));
    if (j == NULL)
        return 0;
    j->kind = JOB_FSYNC;
    j->fd = fd;
    j->datasync = datasync;
    j->req = current_fsync;
    j->done.r.op = FUSEDISK_FSYNC_DONE;
    j->done.r.fh = cookie;
    current_fsync = NULL;
    detached = j;
    return 1;
}

/* Wait until no detached FSYNC is being run or answered. */
void fusedisk_shim_drain(void)
{
    pthread_mutex_lock(&jobs_lock);
    while (fsyncs_in_flight > 0)
        pthread_cond_wait(&fsyncs_drained, &jobs_lock);
    pthread_mutex_unlock(&jobs_lock);
}

/* Start writeback of the dirty pages of *fd* on a thread; at most one queued per fd. */
void fusedisk_shim_write_behind(int fd)
{
    pthread_mutex_lock(&jobs_lock);
    for (int i = 0; i < write_behind_queued; i++) {
        if (write_behind_fds[i] == fd) {
            pthread_mutex_unlock(&jobs_lock);
            fusedisk_shim_write_behinds_merged++;
            return;
        }
    }
    int room = write_behind_queued < MAX_WRITE_BEHIND;
    if (room)
        write_behind_fds[write_behind_queued++] = fd;
    pthread_mutex_unlock(&jobs_lock);
    if (!room)
        return; /* only an optimisation */
    struct job *j = calloc(1, sizeof(*j));
    if (j == NULL) {
        forget_write_behind(fd);
        return;
    }
    j->kind = JOB_WRITE_BEHIND;
    j->fd = fd;
    submit(j);
}

int fuse_reply_err(fuse_req_t req, int err)
{
    if (real_reply_err == NULL && !resolve_replies())
        abort(); /* fuse_session_new made sure of them; nothing can answer without */
    struct job *j = detached;
    if (j != NULL && j->req == req) {
        detached = NULL;
        if (err == 0) {
            fusedisk_shim_fsyncs++;
            submit(j);
            return 0;
        }
        /* the handler failed after all: its errno goes out, the daemon leaves the gate */
        int ret = real_reply_err(req, err);
        j->done.r.mode = err;
        push(&j->done);
        return ret;
    }
    if (req == current_fsync)
        current_fsync = NULL; /* answered the ordinary way */
    return real_reply_err(req, err);
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    if (real_reply_open == NULL && !resolve_replies())
        abort();
    if (!parallel_writes_wanted || !fi->direct_io)
        return real_reply_open(req, fi);
    struct fuse_open_out out;
    memset(&out, 0, sizeof(out));
    out.fh = fi->fh;
    out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
    if (fi->keep_cache)
        out.open_flags |= FOPEN_KEEP_CACHE;
    if (fi->nonseekable)
        out.open_flags |= FOPEN_NONSEEKABLE;
    if (fi->cache_readdir)
        out.open_flags |= FOPEN_CACHE_DIR;
    if (fi->noflush)
        out.open_flags |= FOPEN_NOFLUSH;
    fusedisk_shim_parallel_opens++;
    return fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

static void shim_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    current_token = current_token % FH_TOKEN_MASK + 1; /* 1..FH_TOKEN_MASK, never 0 */
    current_fsync = req;
    copy.fh |= current_token << FH_TOKEN_SHIFT;
    next_fsync(req, ino, datasync, &copy);
}


/* -- closing behind (fusedisk_shim_close_behind) ----------------------------
 * The last descriptor of a removed file is where the store frees its inode
 * (~200 µs on ext4): the daemon hands such descriptors to this one thread,
 * which closes them with no Python and no GIL. Its own queue and lock: the
 * fsync threads above are not in the way of a guest's FSYNC. */

struct closing {
    struct closing *next;
    int fd;
};

static pthread_mutex_t closing_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t closing_ready = PTHREAD_COND_INITIALIZER;
static pthread_cond_t closing_done = PTHREAD_COND_INITIALIZER;
static struct closing *closing_head, *closing_tail;
static int closer_started, closer_idle;
/* Descriptors handed over, and of those closed (fuseshim.statistics). */
unsigned long fusedisk_shim_closes, fusedisk_shim_closed;

static void *serve_closes(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&closing_lock);
    for (;;) {
        while (closing_head == NULL) {
            closer_idle = 1;
            pthread_cond_wait(&closing_ready, &closing_lock);
        }
        closer_idle = 0;
        struct closing *c = closing_head;
        closing_head = c->next;
        if (closing_head == NULL)
            closing_tail = NULL;
        pthread_mutex_unlock(&closing_lock);
        (void)close(c->fd); /* Linux frees the number whatever close returns */
        free(c);
        pthread_mutex_lock(&closing_lock);
        fusedisk_shim_closed++;
        if (fusedisk_shim_closed == fusedisk_shim_closes)
            pthread_cond_broadcast(&closing_done);
    }
    return NULL;
}

/* Close *fd* on the closer thread (1), or not (0: out of memory or no thread: the
 * caller closes it). Never blocks for long. */
int fusedisk_shim_close_behind(int fd)
{
    struct closing *c = malloc(sizeof(*c));
    if (c == NULL)
        return 0;
    c->fd = fd;
    c->next = NULL;
    pthread_mutex_lock(&closing_lock);
    if (!closer_started) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        closer_started = pthread_create(&thread, &attr, serve_closes, NULL) == 0;
        pthread_attr_destroy(&attr);
        if (!closer_started) {
            pthread_mutex_unlock(&closing_lock);
            free(c);
            return 0;
        }
    }
    if (closing_tail != NULL)
        closing_tail->next = c;
    else
        closing_head = c;
    closing_tail = c;
    fusedisk_shim_closes++;
    int wake = closer_idle;
    pthread_mutex_unlock(&closing_lock);
    if (wake)
        pthread_cond_signal(&closing_ready);
    return 1;
}

/* Wait until every descriptor handed over is closed. */
void fusedisk_shim_drain_closes(void)
{
    pthread_mutex_lock(&closing_lock);
    while (fusedisk_shim_closed != fusedisk_shim_closes)
        pthread_cond_wait(&closing_done, &closing_lock);
    pthread_mutex_unlock(&closing_lock);
}

/* -- FUSE_HANDLE_KILLPRIV_V2: the INIT flag and the requests' kill flags ------ */

static int killpriv_wanted;
/* 1 once the INIT reply carried FUSE_HANDLE_KILLPRIV_V2 (fuseshim.killpriv_v2). */
int fusedisk_shim_killpriv_v2;
/* The INIT request's unique while its reply is due, and whether the kernel offered
 * the flag (trio thread: INIT is read and answered there). */
static uint64_t init_unique;
static int init_offers_killpriv;
/* The request read last asked to kill set-uid/set-gid. libfuse reads a request and
 * dispatches it to its handler before it reads the next (trio thread only). */
static int request_kills;
/* Requests that carried a kill flag, by kind: write, setattr, open/create. */
unsigned long fusedisk_shim_kills[3];

void fusedisk_shim_enable_killpriv(int enable)
{
    killpriv_wanted = enable;
}

/* -- FUSE_AUTO_INVAL_DATA off (fusedisk_shim_disable_auto_inval) -------------
 * libfuse asks for it by default: the kernel then refreshes a file's attributes
 * before each read once a write made them stale (a GETATTR per read after a
 * write), to notice changes made behind its back and drop its page cache. Every
 * change of fusedisk's files passes through the mount, and the one the kernel
 * cannot see (a direct_io write beside cached handles) is invalidated by the
 * daemon itself (pagecache.py), so the refresh finds nothing. */
static int auto_inval_off;
/* 1 once a session's INIT was answered without FUSE_AUTO_INVAL_DATA. */
int fusedisk_shim_auto_inval_off;

void fusedisk_shim_disable_auto_inval(int disable)
{
    auto_inval_off = disable;
}

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    if (next_init != NULL)
        next_init(userdata, conn);
    if (auto_inval_off) {
        conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
        fusedisk_shim_auto_inval_off = 1;
    }
}

static void note_request(const char *buf, size_t len)
{
    request_kills = 0;
    if (len < sizeof(struct fuse_in_header))
        return;
    const struct fuse_in_header *in = (const struct fuse_in_header *)buf;
    const char *arg = buf + sizeof(*in);
    size_t arg_len = len - sizeof(*in);
    switch (in->opcode) {
    case FUSE_INIT:
        if (arg_len >= offsetof(struct fuse_init_in, flags) + sizeof(uint32_t)) {
            const struct fuse_init_in *init = (const struct fuse_init_in *)arg;
            init_offers_killpriv = (init->flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
            init_unique = in->unique;
        }
        break;
    case FUSE_WRITE:
        if (arg_len >= sizeof(struct fuse_write_in))
            request_kills = (((const struct fuse_write_in *)arg)->write_flags &
                             FUSE_WRITE_KILL_SUIDGID) != 0;
        break;
    case FUSE_SETATTR:
        if (arg_len >= sizeof(struct fuse_setattr_in))
            request_kills = (((const struct fuse_setattr_in *)arg)->valid &
                             FATTR_KILL_SUIDGID) != 0;
        break;
    case FUSE_OPEN:
        if (arg_len >= sizeof(struct fuse_open_in))
            request_kills = (((const struct fuse_open_in *)arg)->open_flags &
                             FUSE_OPEN_KILL_SUIDGID) != 0;
        break;
    case FUSE_CREATE:
        if (arg_len >= sizeof(struct fuse_create_in))
            request_kills = (((const struct fuse_create_in *)arg)->open_flags &
                             FUSE_OPEN_KILL_SUIDGID) != 0;
        break;
    default:
        break;
    }
}

/* Whether the request being dispatched asked for a kill; counts it by *kind*. */
static int take_kill(int kind)
{
    if (!request_kills)
        return 0;
    request_kills = 0;
    fusedisk_shim_kills[kind]++;
    return 1;
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    ssize_t got = read(fd, buf, len);
    if (got > 0)
        note_request(buf, (size_t)got);
    return got;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    /* any thread may reply; only the INIT reply, sent on the trio thread before any
     * other request is read, is touched */
    uint64_t init = __atomic_load_n(&init_unique, __ATOMIC_RELAXED);
    if (init != 0 && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header)) {
        const struct fuse_out_header *out = iov[0].iov_base;
        if (out->unique == init) {
            __atomic_store_n(&init_unique, 0, __ATOMIC_RELAXED);
            if (out->error == 0 && init_offers_killpriv &&
                iov[1].iov_len >= offsetof(struct fuse_init_out, flags) + sizeof(uint32_t)) {
                ((struct fuse_init_out *)iov[1].iov_base)->flags |= FUSE_HANDLE_KILLPRIV_V2;
                fusedisk_shim_killpriv_v2 = 1;
            }
        }
    }
    return writev(fd, iov, count);
}

static const struct fuse_custom_io plain_io = {.writev = io_writev, .read = io_read};

static void shim_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    if (!take_kill(1)) {
        next_setattr(req, ino, attr, to_set, fi);
        return;
    }
    struct fuse_file_info copy;
    if (fi != NULL)
        copy = *fi;
    else
        memset(&copy, 0, sizeof(copy)); /* fh 0 is no handle of fusedisk's */
    copy.fh |= FH_KILL_SUIDGID;
    next_setattr(req, ino, attr, to_set, &copy);
}

static void shim_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (take_kill(2))
        fi->flags |= OPEN_KILL_SUIDGID; /* libfuse's own copy for this request */
    next_open(req, ino, fi);
}

static void shim_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                        struct fuse_file_info *fi)
{
    if (take_kill(2))
        fi->flags |= OPEN_KILL_SUIDGID;
    next_create(req, parent, name, mode, fi);
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
    copy.fh |= sync_bits(fi->flags) | (take_kill(0) ? FH_KILL_SUIDGID : 0);
    next_write(req, ino, buf, size, off, &copy);
}

static void shim_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    copy.fh |= sync_bits(fi->flags) | (take_kill(0) ? FH_KILL_SUIDGID : 0);
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
    if (!resolve_replies()) {
        fusedisk_shim_error = "libfuse's reply functions were not found behind the shim";
        return NULL;
    }
    read_stall();
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
        next_fsync = wrapped_ops.fsync;
        /* detached FSYNCs report back through the queue the extra handlers use */
        if (fast_fsync_wanted && next_fsync != NULL)
            wrapped_ops.fsync = shim_fsync;
        wrapped_ops.fallocate = shim_fallocate;
        wrapped_ops.copy_file_range = shim_copy_file_range;
        wrapped_ops.lseek = shim_lseek;
        /* the copy is a whole table of the libfuse this was built against (zeroed
         * past pyfuse3's part), so libfuse may read all of it */
        op_size = sizeof(wrapped_ops);
    }
    next_init = wrapped_ops.init;
    wrapped_ops.init = shim_init;
    if (killpriv_wanted) {
        next_setattr = wrapped_ops.setattr;
        next_open = wrapped_ops.open;
        next_create = wrapped_ops.create;
        if (next_setattr != NULL)
            wrapped_ops.setattr = shim_setattr;
        if (next_open != NULL)
            wrapped_ops.open = shim_open;
        if (next_create != NULL)
            wrapped_ops.create = shim_create;
    }
    fusedisk_shim_error = "";
    struct fuse_session *se = real(args, &wrapped_ops, op_size, userdata);
    if (se != NULL && killpriv_wanted) {
        /* fuse_session_mount puts the /dev/fuse fd in place of this one, which
         * stays open (one per session) so that nothing else is ever closed for it */
        int placeholder = open("/dev/null", O_RDONLY | O_CLOEXEC);
        /* without it no flag is seen and the INIT reply is not touched: the kernel
         * kills as before, and the wrappers pass every request on unchanged */
        if (placeholder >= 0 && fuse_session_custom_io(se, &plain_io, placeholder) != 0)
            close(placeholder);
    }
    fusedisk_shim_sessions++;
    return se;
}
