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
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <string.h>

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
    /* pyfuse3 has loaded libfuse by now; ask it directly (the shim itself
     * references no libfuse symbol, so the linker may not record it as needed
     * and RTLD_NEXT would not reach it). */
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
    fusedisk_shim_error = "";
    fusedisk_shim_sessions++;
    return real(args, &wrapped_ops, op_size, userdata);
}
