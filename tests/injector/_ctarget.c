/* Test target for the injector: blocks in one chosen system call and reports, on stdout,
 * exactly what that call returned (so a spurious EINTR or a leaked restart code shows).
 * Built by the tests with gcc in a temp dir; the product never compiles anything. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, alrm_runs, rt_runs;
static volatile long alrm_overruns;

__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...) {
    char buf[160];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    (void)!write(1, buf, n);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void on_usr1(int sig) { (void)sig; usr1 = 1; }
static void on_alrm(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc; alrm_runs++; alrm_overruns += si->si_overrun;
}
static void on_rt(int sig) { (void)sig; rt_runs++; }

static void handler(int sig, void (*fn)(int), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = flags;
    sigaction(sig, &sa, NULL);
}

static void *reader(void *arg) {
    char c;
    (void)arg;
    ssize_t n = read(0, &c, 1);
    say("thread read=%ld errno=%ld\n", n, n < 0 ? (long)errno : 0L);
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "read";
    char c;
    long r;
    handler(SIGUSR1, on_usr1, 0);  /* no SA_RESTART: a handler run means EINTR, legitimately */

    if (!strcmp(mode, "read")) {
        say("ready\n");
        r = read(0, &c, 1);
        say("read=%ld errno=%ld\n", r, r < 0 ? (long)errno : 0L);
    } else if (!strcmp(mode, "accept")) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
        socklen_t len = sizeof a;
        bind(s, (struct sockaddr *)&a, sizeof a);
        listen(s, 4);
        getsockname(s, (struct sockaddr *)&a, &len);
        say("ready port=%d\n", ntohs(a.sin_port));
        r = accept(s, NULL, NULL);
        say("accept=%ld errno=%ld\n", r >= 0 ? 1 : r, r < 0 ? (long)errno : 0L);
    } else if (!strcmp(mode, "epoll")) {
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
        say("ready\n");
        r = epoll_wait(ep, &ev, 1, -1);
        say("epoll=%ld errno=%ld\n", r, r < 0 ? errno : (long)ev.data.u64 - 42);
    } else if (!strcmp(mode, "poll")) {
        struct pollfd p = {.fd = 0, .events = POLLIN};
        say("ready\n");
        r = poll(&p, 1, -1);
        say("poll=%ld errno=%ld\n", r, r < 0 ? (long)errno : 0L);
    } else if (!strcmp(mode, "select")) {
        fd_set set;
        FD_ZERO(&set);
        FD_SET(0, &set);
        say("ready\n");
        r = select(1, &set, NULL, NULL, NULL);
        say("select=%ld errno=%ld\n", r, r < 0 ? (long)errno : 0L);
    } else if (!strcmp(mode, "nanosleep")) {
        long ms = argc > 2 ? atol(argv[2]) : 400;
        struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
        say("ready\n");
        double t0 = now_ms();
        r = nanosleep(&ts, NULL);
        say("nanosleep=%ld errno=%ld", r, r < 0 ? (long)errno : 0L);
        say(" elapsed_ms=%ld\n", (long)(now_ms() - t0));
        (void)!read(0, &c, 1);
    } else if (!strcmp(mode, "pause")) {
        say("ready\n");
        r = pause();
        say("pause=%ld errno=%ld", r, r < 0 ? (long)errno : 0L);
        say(" usr1=%d\n", (int)usr1);
    } else if (!strcmp(mode, "futex")) {
        pthread_t t;
        pthread_create(&t, NULL, reader, NULL);
        say("ready\n");
        r = pthread_join(t, NULL);  /* main thread waits in a futex */
        say("join=%ld errno=0\n", r);
    } else if (!strcmp(mode, "zombie-leader")) {
        pthread_t t;
        pthread_create(&t, NULL, reader, NULL);
        say("ready\n");
        pthread_exit(NULL);  /* the main thread is gone; the process lives on */
    } else if (!strcmp(mode, "vfork")) {
        say("ready\n");
        pid_t child = vfork();  /* parent sleeps uninterruptibly until the child exits */
        if (child == 0) {
            usleep(atol(argc > 2 ? argv[2] : "800") * 1000);
            _exit(0);
        }
        waitpid(child, NULL, 0);
        say("vfork done\n");
        (void)!read(0, &c, 1);
    } else if (!strcmp(mode, "signals")) {
        /* A POSIX timer sends SIGALRM every millisecond (SA_RESTART); the handler adds
         * 1 + si_overrun, so every expiry is accounted for. SIGRTMIN is queued per send.
         * The main thread loops in read(); with SA_RESTART any EINTR there is spurious. */
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_alrm;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigaction(SIGALRM, &sa, NULL);
        handler(SIGRTMIN, on_rt, SA_RESTART);
        timer_t timer;
        struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGALRM};
        struct itimerspec its = {{0, 1000000}, {0, 1000000}};
        int itimer = argc > 2 && !strcmp(argv[2], "setitimer");  /* coalescing, no overruns */
        struct itimerval itv = {{0, 1000}, {0, 1000}}, itv_off = {{0, 0}, {0, 0}};
        double t0 = now_ms();
        if (itimer) {
            setitimer(ITIMER_REAL, &itv, NULL);
        } else {
            timer_create(CLOCK_MONOTONIC, &sev, &timer);
            timer_settime(timer, 0, &its, NULL);
        }
        say("ready\n");
        long eintr = 0, other = 0;
        for (;;) {
            r = read(0, &c, 1);
            if (r < 0 && errno == EINTR) eintr++;
            else if (r < 0) other++;
            else if (r == 1 && c == 'q') break;
        }
        struct itimerspec off = {{0, 0}, {0, 0}};
        if (itimer)
            setitimer(ITIMER_REAL, &itv_off, NULL);
        else
            timer_settime(timer, 0, &off, NULL);
        double elapsed = now_ms() - t0;
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, NULL);
        say("eintr=%ld other=%ld", eintr, other);
        say(" alrm=%ld overruns=%ld", (long)alrm_runs, alrm_overruns);
        say(" rt=%ld elapsed_ms=%ld\n", (long)rt_runs, (long)elapsed);
    } else if (!strcmp(mode, "idle")) {
        say("ready\n");
        for (;;) {
            r = read(0, &c, 1);
            if (r <= 0) break;
        }
    }
    return 0;
}
