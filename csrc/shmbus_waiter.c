/* shmbus waiter: see shmbus_waiter.h. */
#define _GNU_SOURCE
#include "shmbus_waiter.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct shmbus_waiter {
    shmbus_ring_t *ring;
    int fd;
    pthread_t thread;
    pthread_mutex_t mu; /* guards the three below */
    pthread_cond_t cv;  /* armed or stopping set */
    int64_t spin_ns;    /* of this arming */
    bool armed;
    bool stopping;
    int error; /* errno of the failure that ended the thread, or 0 */
};

static void fire(shmbus_waiter_t *w)
{
    uint64_t one = 1;
    /* EAGAIN only if the counter were about to overflow: it is readable then. */
    while (write(w->fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static void *run(void *arg)
{
    shmbus_waiter_t *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->armed && !w->stopping)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->stopping)
            break;
        int64_t spin_ns = w->spin_ns;
        w->spin_ns = 0; /* spin once per arming: a stale post must not start another */
        /* Read under the lock, after the look at stopping: free's ring
         * comes after this read, so the sleep below cannot miss it. */
        uint32_t seq = shmbus_ring_bell(w->ring);
        pthread_mutex_unlock(&w->mu);
        int rc = shmbus_ring_wait_once(w->ring, spin_ns, seq);
        int saved = errno;
        pthread_mutex_lock(&w->mu);
        if (rc == SHMBUS_EAGAIN || rc == SHMBUS_EINTR)
            continue; /* woken with nothing there: still armed, unless stopping */
        /* Disarm before the eventfd says so: the loop arms again only after
         * it saw the eventfd, so that arming is never undone here. */
        w->armed = false;
        if (rc != SHMBUS_OK) {
            w->error = saved ? saved : EIO;
            fire(w); /* the loop looks, and hears of the error when it arms */
            break;
        }
        fire(w);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int shmbus_waiter_new(shmbus_ring_t *inbox, shmbus_waiter_t **out)
{
    if (!inbox || !out)
        return SHMBUS_EINVAL;
    shmbus_waiter_t *w = calloc(1, sizeof *w);
    if (!w)
        return SHMBUS_ESYS;
    w->ring = inbox;
    w->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->fd < 0) {
        free(w);
        return SHMBUS_ESYS;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    shmbus_ring_retain(inbox);
    /* No signal handler ever runs in this thread (it inherits this mask):
     * Python's handlers want the main thread, and the waits stay unbroken. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&w->thread, NULL, run, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        shmbus_ring_close(inbox);
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        close(w->fd);
        free(w);
        errno = rc;
        return SHMBUS_ESYS;
    }
    pthread_setname_np(w->thread, "shmbus-waiter");
    *out = w;
    return SHMBUS_OK;
}

int shmbus_waiter_fd(const shmbus_waiter_t *w) { return w->fd; }

int shmbus_waiter_arm(shmbus_waiter_t *w, int64_t spin_ns)
{
    pthread_mutex_lock(&w->mu);
    int error = w->error;
    if (!error && !w->armed) {
        w->armed = true;
        w->spin_ns = spin_ns;
        pthread_cond_signal(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    if (error) {
        errno = error;
        return SHMBUS_ESYS;
    }
    return SHMBUS_OK;
}

int shmbus_waiter_clear(shmbus_waiter_t *w)
{
    uint64_t n;
    ssize_t got;
    while ((got = read(w->fd, &n, sizeof n)) < 0 && errno == EINTR)
        ;
    return got == (ssize_t)sizeof n;
}

void shmbus_waiter_free(shmbus_waiter_t *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    bool on_bell = w->armed; /* in (or about to enter) the ring's wait */
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    if (on_bell)
        shmbus_ring_wake(w->ring);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    close(w->fd);
    shmbus_ring_close(w->ring);
    free(w);
}
