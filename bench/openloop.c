/*
 * openloop: a constant-rate HTTP/1.1 load generator that measures from each request's
 * scheduled send time (no coordinated omission).
 *
 *   openloop -a HOST -p PORT -u PATH -b BODY [-H "Name: value"]... -c CONNS
 *            -s RATE:SECONDS[,RATE:SECONDS...] -o FILE [-w DRAIN_SECONDS] [-t TIMEOUT_S]
 *
 * Request i of a phase is due at the phase's start + i / RATE. A due request goes out on an
 * idle keep-alive connection (one request in flight per connection, no pipelining); when all
 * connections are busy it waits in the generator, and its latency still counts from when it
 * was due, so a server that stalls is charged for every request it delayed. Each answer is
 * recorded as (due time, latency, status) in FILE, 24 bytes per request: int64 due time in
 * ns from the start, int64 latency in ns, int32 status (0: the connection failed or the
 * request timed out; -1: never sent before the drain ended), int32 phase. After the last
 * phase the generator waits up to DRAIN_SECONDS for the answers still owed.
 *
 * One thread, epoll, nonblocking sockets. Build: cc -O2 -o openloop openloop.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PHASES 16
#define BUF 16384

typedef struct {
    int64_t due;
    int64_t latency;
    int32_t status;
    int32_t phase;
} record_t;

typedef struct {
    int fd;
    int busy;         /* a request is in flight */
    int64_t due;      /* its due time (ns since start) */
    int64_t sent;     /* when it was written (for the timeout) */
    int32_t phase;
    size_t have;      /* bytes of the answer read so far */
    char buf[BUF];
} conn_t;

static struct sockaddr_in addr;
static char *request;
static size_t request_len;
static int epfd;
static int64_t t0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec - t0;
}

static int open_conn(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    c->fd = fd;
    c->busy = 0;
    c->have = 0;
    return 0;
}

static void close_conn(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->busy = 0;
    c->have = 0;
}

/* Length of a complete answer in buf (headers + body), 0 if incomplete, -1 if malformed.
 * Sets *status and *closes (the server said Connection: close). */
static long answer_length(const char *buf, size_t n, int *status, int *closes) {
    const char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (end == NULL) return n >= BUF ? -1 : 0;
    size_t head = (size_t)(end - buf) + 4;
    if (n < 12 || strncmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    long length = -1;
    *closes = 0;
    const char *line = memchr(buf, '\n', head);
    while (line != NULL && line + 1 < buf + head) {
        line++;
        if (strncasecmp(line, "content-length:", 15) == 0) length = atol(line + 15);
        else if (strncasecmp(line, "connection:", 11) == 0) {
            const char *v = line + 11;
            while (*v == ' ') v++;
            if (strncasecmp(v, "close", 5) == 0) *closes = 1;
        }
        line = memchr(line, '\n', (size_t)(buf + head - line));
    }
    if (length < 0) return -1; /* only Content-Length answers are expected */
    if (n < head + (size_t)length) return 0;
    return (long)(head + (size_t)length);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/predict", *body = "", *out = NULL;
    const char *headers[32];
    int nheaders = 0, port = 8000, conns = 64;
    double drain = 5.0, timeout = 10.0;
    double rates[MAX_PHASES], secs[MAX_PHASES];
    int nphases = 0;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:u:b:H:c:s:o:w:t:")) != -1) {
        switch (opt) {
        case 'a': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'u': path = optarg; break;
        case 'b': body = optarg; break;
        case 'H': if (nheaders < 32) headers[nheaders++] = optarg; break;
        case 'c': conns = atoi(optarg); break;
        case 'o': out = optarg; break;
        case 'w': drain = atof(optarg); break;
        case 't': timeout = atof(optarg); break;
        case 's': {
            char *spec = strdup(optarg), *save = NULL;
            for (char *p = strtok_r(spec, ",", &save); p && nphases < MAX_PHASES;
                 p = strtok_r(NULL, ",", &save)) {
                if (sscanf(p, "%lf:%lf", &rates[nphases], &secs[nphases]) != 2) {
                    fprintf(stderr, "bad phase %s\n", p);
                    return 2;
                }
                nphases++;
            }
            break;
        }
        default:
            fprintf(stderr, "usage: see the comment at the top of openloop.c\n");
            return 2;
        }
    }
    if (out == NULL || nphases == 0 || conns < 1) {
        fprintf(stderr, "need -o FILE, -s RATE:SECONDS and -c CONNS >= 1\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, host, &addr.sin_addr);

    /* The request, built once. */
    size_t cap = 4096 + strlen(body);
    request = malloc(cap);
    int len = snprintf(request, cap,
                       "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                       "Content-Length: %zu\r\n",
                       path, host, port, strlen(body));
    for (int i = 0; i < nheaders; i++) len += snprintf(request + len, cap - len, "%s\r\n", headers[i]);
    len += snprintf(request + len, cap - len, "\r\n%s", body);
    request_len = (size_t)len;

    /* Schedule: phase boundaries in ns, and the number of requests of each phase. */
    int64_t starts[MAX_PHASES + 1];
    int64_t counts[MAX_PHASES];
    int64_t total = 0;
    starts[0] = 0;
    for (int i = 0; i < nphases; i++) {
        counts[i] = (int64_t)(rates[i] * secs[i]);
        starts[i + 1] = starts[i] + (int64_t)(secs[i] * 1e9);
        total += counts[i];
    }
    record_t *records = calloc((size_t)total + (size_t)conns + 1, sizeof(record_t));
    int64_t nrec = 0;

    epfd = epoll_create1(0);
    conn_t *pool = calloc((size_t)conns, sizeof(conn_t));
    int *idle = malloc(sizeof(int) * (size_t)conns);
    int nidle = 0;
    t0 = 0;
    for (int i = 0; i < conns; i++) {
        pool[i].fd = -1;
        if (open_conn(&pool[i]) < 0) {
            perror("connect");
            return 1;
        }
        idle[nidle++] = i;
    }
    t0 = now_ns() + 1000000; /* the schedule starts 1 ms from now */

    int phase = 0;
    int64_t index = 0; /* next request of the phase */
    int64_t end = starts[nphases];
    int64_t stop = end + (int64_t)(drain * 1e9);
    int64_t to_ns = (int64_t)(timeout * 1e9);
    int64_t inflight = 0, sent = 0, failed_connects = 0;
    struct epoll_event events[256];
    int64_t last_timeout_scan = 0;

    for (;;) {
        int64_t now = now_ns();
        /* Send what is due, while there are idle connections. */
        while (phase < nphases && nidle > 0) {
            if (index >= counts[phase]) {
                phase++;
                index = 0;
                continue;
            }
            int64_t due = starts[phase] + (int64_t)((double)index * 1e9 / rates[phase]);
            if (due > now) break;
            conn_t *c = &pool[idle[--nidle]];
            if (c->fd < 0 && open_conn(c) < 0) {
                failed_connects++;
                records[nrec++] = (record_t){due, now - due, 0, phase};
                idle[nidle++] = (int)(c - pool);
                index++;
                continue;
            }
            ssize_t w = write(c->fd, request, request_len);
            if (w != (ssize_t)request_len) { /* loopback, small request: all or nothing */
                records[nrec++] = (record_t){due, now - due, 0, phase};
                close_conn(c);
                idle[nidle++] = (int)(c - pool);
                index++;
                continue;
            }
            c->busy = 1;
            c->due = due;
            c->sent = now;
            c->phase = phase;
            c->have = 0;
            inflight++;
            sent++;
            index++;
        }
        if (phase >= nphases && inflight == 0) break;
        if (now > stop) break;

        /* Wait for answers, or until the next request is due. */
        int64_t wait_ns = 1000000; /* at most 1 ms */
        if (phase < nphases && nidle > 0 && index < counts[phase]) {
            int64_t due = starts[phase] + (int64_t)((double)index * 1e9 / rates[phase]);
            wait_ns = due - now;
            if (wait_ns < 0) wait_ns = 0;
            if (wait_ns > 1000000) wait_ns = 1000000;
        }
        struct timespec tmo = {0, (long)wait_ns};
        int n = epoll_pwait2(epfd, events, 256, &tmo, NULL);
        now = now_ns();
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (c->fd < 0) continue;
            ssize_t r = read(c->fd, c->buf + c->have, BUF - c->have);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) { /* closed or failed */
                int was_busy = c->busy;
                if (was_busy) {
                    records[nrec++] = (record_t){c->due, now - c->due, 0, c->phase};
                    inflight--;
                }
                close_conn(c); /* reopened when next used */
                /* An idle connection the server closed (keep-alive timeout) is already on the
                 * idle stack. */
                if (was_busy) idle[nidle++] = (int)(c - pool);
                continue;
            }
            c->have += (size_t)r;
            if (!c->busy) continue; /* unexpected bytes: ignored */
            int status = 0, closes = 0;
            long got = answer_length(c->buf, c->have, &status, &closes);
            if (got == 0) continue;
            if (got < 0) status = 0, closes = 1;
            records[nrec++] = (record_t){c->due, now - c->due, status, c->phase};
            inflight--;
            c->busy = 0;
            c->have = 0;
            if (closes) close_conn(c);
            idle[nidle++] = (int)(c - pool);
        }
        /* Requests past the timeout: give up on their connection. */
        if (now - last_timeout_scan > 100000000) {
            last_timeout_scan = now;
            for (int i = 0; i < conns; i++) {
                conn_t *c = &pool[i];
                if (c->busy && now - c->sent > to_ns) {
                    records[nrec++] = (record_t){c->due, now - c->due, 0, c->phase};
                    inflight--;
                    close_conn(c);
                    idle[nidle++] = i;
                }
            }
        }
    }
    /* What was due but never sent, or never answered, by the end of the drain. */
    int64_t now = now_ns();
    for (int i = 0; i < conns; i++)
        if (pool[i].busy) records[nrec++] = (record_t){pool[i].due, now - pool[i].due, 0, pool[i].phase};
    int64_t unsent = 0;
    while (phase < nphases) {
        for (; index < counts[phase]; index++) {
            int64_t due = starts[phase] + (int64_t)((double)index * 1e9 / rates[phase]);
            records[nrec++] = (record_t){due, now - due, -1, phase};
            unsent++;
        }
        phase++;
        index = 0;
    }
    FILE *f = fopen(out, "wb");
    if (f == NULL) {
        perror(out);
        return 1;
    }
    fwrite(records, sizeof(record_t), (size_t)nrec, f);
    fclose(f);
    fprintf(stderr, "scheduled %lld sent %lld recorded %lld unsent %lld failed connects %lld\n",
            (long long)total, (long long)sent, (long long)nrec, (long long)unsent,
            (long long)failed_connects);
    return 0;
}
