/* shmbus segments: see shmbus_seg.h. */
#define _GNU_SOURCE
#include "shmbus_seg.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int shmbus_seg_create(const char *name, uint64_t size, void **base)
{
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
    if (fd < 0)
        return SHMBUS_ESYS;
    /* Exactly 0600 whatever the umask: attach maps nothing else. */
    int err = fchmod(fd, 0600) == 0 ? posix_fallocate(fd, 0, (off_t)size) : errno;
    void *p = MAP_FAILED;
    if (err == 0) {
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        err = p == MAP_FAILED ? errno : 0;
    }
    close(fd);
    if (err) {
        shm_unlink(name);
        errno = err;
        return SHMBUS_ESYS;
    }
    *base = p;
    return SHMBUS_OK;
}

/* O_NOFOLLOW: /dev/shm is shared by every user; a symlink planted there
 * must not lead us to a file of theirs. */
static int open_own(const char *name, struct stat *st)
{
    int fd = shm_open(name, O_RDWR | O_NOFOLLOW, 0);
    if (fd < 0)
        return -1;
    if (fstat(fd, st) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static bool own_and_private(const struct stat *st)
{
    return S_ISREG(st->st_mode) && st->st_uid == geteuid() && (st->st_mode & 07777) == 0600;
}

int shmbus_seg_attach(const char *name, uint64_t min_size, uint64_t max_size, void **base,
                      uint64_t *size)
{
    struct stat st;
    int fd = open_own(name, &st);
    if (fd < 0)
        return SHMBUS_ESYS;
    int rc = SHMBUS_OK;
    if (!own_and_private(&st)) {
        rc = SHMBUS_EFOREIGN;
    } else if ((uint64_t)st.st_size < min_size || (uint64_t)st.st_size > max_size) {
        rc = SHMBUS_EBADSEG;
    } else {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            rc = SHMBUS_ESYS;
        } else {
            *base = p;
            *size = (uint64_t)st.st_size;
        }
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int shmbus_seg_map_head(const char *name, uint64_t size, void **base)
{
    struct stat st;
    int fd = open_own(name, &st);
    if (fd < 0)
        return SHMBUS_ESYS;
    int rc = SHMBUS_OK;
    if (!own_and_private(&st)) {
        rc = SHMBUS_EFOREIGN;
    } else if ((uint64_t)st.st_size < size) {
        rc = SHMBUS_EBADSEG;
    } else {
        void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            rc = SHMBUS_ESYS;
        else
            *base = p;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

void shmbus_seg_unmap(void *base, uint64_t size)
{
    if (base)
        munmap(base, size);
}

int shmbus_seg_unlink(const char *name)
{
    return shm_unlink(name) == 0 ? SHMBUS_OK : SHMBUS_ESYS;
}
