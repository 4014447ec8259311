/* clockshift: an LD_PRELOAD library that shifts a process's wall clock, and nothing else.
 *
 * Every read of the wall clock (clock_gettime for CLOCK_REALTIME and CLOCK_REALTIME_COARSE,
 * gettimeofday, time, timespec_get with TIME_UTC) returns the real time plus the offset
 * given in seconds by the environment variable CLOCKSHIFT_SECONDS (read once; may be
 * negative and fractional, e.g. "-3600" or "2.5").
 *
 * Monotonic clocks and all waiting (nanosleep, clock_nanosleep, select, poll, futexes,
 * sem_clockwait ...) are left alone on purpose: Debian's libfaketime also rewrites timed
 * waits, and a process under it hangs in time.sleep() or Event.wait(timeout). A skewed
 * worker must still sleep, poll and time out in real time; only its idea of "now" is off.
 *
 * glibc's time() and gettimeofday() read the vDSO directly rather than calling
 * clock_gettime through the PLT, so each entry point is interposed on its own.
 *
 * Build: gcc -shared -fPIC -O2 -o clockshift.so clockshift.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

#define NS_PER_SEC 1000000000LL

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);
typedef int (*gettimeofday_fn)(struct timeval *restrict, void *restrict);
typedef int (*timespec_get_fn)(struct timespec *, int);

static clock_gettime_fn real_clock_gettime;
static gettimeofday_fn real_gettimeofday;
static timespec_get_fn real_timespec_get;
static long long offset_ns;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init(void) {
    real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    real_gettimeofday = (gettimeofday_fn)dlsym(RTLD_NEXT, "gettimeofday");
    real_timespec_get = (timespec_get_fn)dlsym(RTLD_NEXT, "timespec_get");
    const char *value = getenv("CLOCKSHIFT_SECONDS");
    if (value != NULL && *value != '\0') {
        double seconds = strtod(value, NULL);
        /* Round to the nearest nanosecond, away from zero at .5 like llround. */
        offset_ns = (long long)(seconds * (double)NS_PER_SEC + (seconds < 0 ? -0.5 : 0.5));
    }
}

/* Read the variable before main() runs, so no thread races the first call; the
 * pthread_once in every entry point covers calls from constructors that run earlier. */
__attribute__((constructor)) static void clockshift_constructor(void) {
    pthread_once(&init_once, init);
}

/* Add the offset to *ts, keeping tv_nsec in [0, 1e9) for negative offsets too. */
static void shift(struct timespec *ts) {
    long long total = (long long)ts->tv_nsec + offset_ns % NS_PER_SEC;
    long long sec = (long long)ts->tv_sec + offset_ns / NS_PER_SEC;
    if (total < 0) {
        total += NS_PER_SEC;
        sec -= 1;
    } else if (total >= NS_PER_SEC) {
        total -= NS_PER_SEC;
        sec += 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)total;
}

static int is_wall_clock(clockid_t clock) {
    return clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    pthread_once(&init_once, init);
    int rc = real_clock_gettime(clock, ts);
    if (rc == 0 && is_wall_clock(clock)) {
        shift(ts);
    }
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    pthread_once(&init_once, init);
    struct timespec ts;
    int rc = real_clock_gettime(CLOCK_REALTIME, &ts);
    if (rc != 0) {
        return real_gettimeofday(tv, tz);
    }
    shift(&ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = (suseconds_t)(ts.tv_nsec / 1000);
    if (tz != NULL) {
        /* The obsolete timezone argument: let glibc fill it, then keep our tv. */
        struct timeval ignored;
        real_gettimeofday(&ignored, tz);
    }
    return 0;
}

time_t time(time_t *out) {
    pthread_once(&init_once, init);
    struct timespec ts;
    if (real_clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return (time_t)-1;
    }
    shift(&ts);
    if (out != NULL) {
        *out = ts.tv_sec;
    }
    return ts.tv_sec;
}

int timespec_get(struct timespec *ts, int base) {
    pthread_once(&init_once, init);
    int rc = real_timespec_get(ts, base);
    if (rc == TIME_UTC) {
        shift(ts);
    }
    return rc;
}
