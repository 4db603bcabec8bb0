/* The shim as a program: what the sh script of offloadfs/shim.py does, without a shell.
 *
 * The mount serves these bytes as every shim file when the package was built with them
 * (setup.py links this file statically into offloadfs/_shim); it falls back to the script
 * otherwise, or with OFFLOADFS_SHIM=script. A static program starts in ~0.4 ms where dash
 * and the script take ~0.7 ms, and the kernel opens the shim once (exec) instead of twice
 * (exec, then dash). The protocol is the script's, step for step (shim.py's docstring):
 *
 *   1. open MOUNT/.ctl/NAME read-write (MOUNT/NAME is this program, from /proc/self/exe);
 *   2. write the path, the argument count, the arguments and the first signal caught so far,
 *      each NUL-terminated;
 *   3. read reply lines until one says how to end: t (terminal settings, restored with stty
 *      if the mount dies), z (stop the process group, then write "c" NUL), x (exec the local
 *      command), s (die of a signal), or an exit status (empty: 0).
 *
 * Like the script's traps, handlers record the first forwarded signal and keep the shim
 * alive: signals that arrive while it waits in a FUSE read stay pending, and the agent sees
 * them in /proc/PID/status. tests/unit/test_shim.py checks the forwarded list against
 * protocol.FORWARDED_SIGNALS. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FAILED 255
#define LINE_MAX_ 8192

/* The signals the script traps (protocol.FORWARDED_SIGNALS), in its order. */
static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
#define N_FORWARDED (sizeof forwarded / sizeof forwarded[0])

/* Names of the signals a reply or the request may carry, as kill -s takes them. */
static const struct { const char *name; int num; } signals[] = {
    {"HUP", SIGHUP}, {"INT", SIGINT}, {"QUIT", SIGQUIT}, {"ILL", SIGILL}, {"TRAP", SIGTRAP},
    {"ABRT", SIGABRT}, {"BUS", SIGBUS}, {"FPE", SIGFPE}, {"KILL", SIGKILL},
    {"USR1", SIGUSR1}, {"SEGV", SIGSEGV}, {"USR2", SIGUSR2}, {"PIPE", SIGPIPE},
    {"ALRM", SIGALRM}, {"TERM", SIGTERM},
#ifdef SIGSTKFLT
    {"STKFLT", SIGSTKFLT},
#endif
    {"CHLD", SIGCHLD},
    {"CONT", SIGCONT}, {"STOP", SIGSTOP}, {"TSTP", SIGTSTP}, {"TTIN", SIGTTIN},
    {"TTOU", SIGTTOU}, {"URG", SIGURG}, {"XCPU", SIGXCPU}, {"XFSZ", SIGXFSZ},
    {"VTALRM", SIGVTALRM}, {"PROF", SIGPROF}, {"WINCH", SIGWINCH}, {"IO", SIGIO},
#ifdef SIGPWR
    {"PWR", SIGPWR},
#endif
    {"SYS", SIGSYS},
};
#define N_SIGNALS (sizeof signals / sizeof signals[0])

static volatile sig_atomic_t caught;   /* the first forwarded signal caught, 0 if none */
static char self[4096];                /* this shim's path in the mount ($0 of the script) */

/* A forwarded signal: remember the first (the script's trap 's=${s:-SIG}'). */
static void on_forwarded(int sig) { if (!caught) caught = sig; }

/* SIGTSTP: ignored while the job runs (the script's trap : TSTP). */
static void on_tstp(int sig) { (void)sig; }

/* Install handler fn (or SIG_DFL) for sig. */
static void handle(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* The number of a signal's name, 0 if unknown. */
static int signum(const char *name)
{
    for (size_t i = 0; i < N_SIGNALS; i++)
        if (strcmp(signals[i].name, name) == 0) return signals[i].num;
    return 0;
}

/* The name of a signal's number, NULL if unknown. */
static const char *signame(int num)
{
    for (size_t i = 0; i < N_SIGNALS; i++)
        if (signals[i].num == num) return signals[i].name;
    return NULL;
}

/* out[n:] gets s, as much as fits before size - 2 (room for the newline); the new n. */
static size_t append(char *out, size_t n, size_t size, const char *s)
{
    size_t k = strlen(s);
    if (n + k > size - 2) k = size - 2 - n;
    memcpy(out + n, s, k);
    return n + k;
}

/* Write all of buf to fd; 0, or -1 with errno. */
static int write_all(int fd, const char *buf, size_t n)
{
    while (n) {
        ssize_t k = write(fd, buf, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One line on stderr: "offloadfs: SELF: " and the parts, up to a NULL. */
static void say(const char *part, ...)
{
    char out[LINE_MAX_];
    size_t n = 0;
    va_list ap;
    va_start(ap, part);
    const char *head[] = {"offloadfs: ", self, ": "};
    for (size_t i = 0; i < 3; i++) n = append(out, n, sizeof out, head[i]);
    for (; part; part = va_arg(ap, const char *)) n = append(out, n, sizeof out, part);
    va_end(ap);
    n = append(out, n, sizeof out, "\n");
    write_all(2, out, n);
}

/* This shim's path (/proc/self/exe) and its control file's (MOUNT/.ctl/NAME) into ctl. */
static int paths(char *ctl, size_t size)
{
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return -1;
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (!slash || (size_t)n + 6 >= size) return -1;
    size_t dir = (size_t)(slash - self);
    memcpy(ctl, self, dir);
    memcpy(ctl + dir, "/.ctl", 5);
    strcpy(ctl + dir + 5, slash);
    return 0;
}

/* The request: path, count, arguments and the first signal caught, each NUL-terminated. */
static char *request(int argc, char **argv, size_t *len)
{
    char count[24];
    int digits = snprintf(count, sizeof count, "%d", argc - 1);
    const char *sig = caught ? signame(caught) : NULL;
    size_t n = strlen(self) + 1 + (size_t)digits + 1 + (sig ? strlen(sig) + 1 : 0);
    for (int i = 1; i < argc; i++) n += strlen(argv[i]) + 1;
    char *buf = malloc(n), *p = buf;
    if (!buf) return NULL;
    p = stpcpy(p, self) + 1;
    p = stpcpy(p, count) + 1;
    for (int i = 1; i < argc; i++) p = stpcpy(p, argv[i]) + 1;
    if (sig) p = stpcpy(p, sig) + 1;
    *len = (size_t)(p - buf);
    return buf;
}

/* The mount died mid-job: the caller's terminal settings back, as `command -p stty T`. */
static void restore_terminal(const char *settings)
{
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        if (null >= 0) dup2(null, 2);
        execl("/bin/stty", "stty", settings, (char *)NULL);
        execl("/usr/bin/stty", "stty", settings, (char *)NULL);
        _exit(127);
    }
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
}

/* Reply x: run the local command with this shim's arguments (the script's exec "$arg" "$@"). */
static int run_local(int ctl, const char *path, char **argv)
{
    close(ctl);
    for (size_t i = 0; i < N_FORWARDED; i++) handle(forwarded[i], SIG_DFL);
    handle(SIGTSTP, SIG_DFL);
    if (caught) kill(getpid(), caught);
    argv[0] = (char *)path;
    execvp(path, argv);   /* execvp: a script without #! runs under /bin/sh, as in dash */
    int err = errno;
    say("cannot run ", path, ": ", strerror(err), NULL);
    return err == ENOENT ? 127 : 126;
}

/* Reply s: die of the job's signal (exit 255 if it does not kill). */
static int die_of(int ctl, const char *name)
{
    close(ctl);
    int sig = signum(name);
    if (sig) {
        handle(sig, SIG_DFL);
        kill(getpid(), sig);
    }
    return FAILED;
}

/* Reply z: stop with the job (the whole process group), then tell the mount we run again. */
static int stop_with(int ctl, const char *name)
{
    int sig = signum(name);
    handle(SIGTSTP, SIG_DFL);
    if (sig) kill(0, sig);
    handle(SIGTSTP, on_tstp);
    return write_all(ctl, "c", 2);
}

/* The exit status a reply line gives ("" is 0), or -1 if it is not a number. */
static int status_of(const char *word)
{
    if (!*word) return 0;
    char *end;
    long v = strtol(word, &end, 10);
    return *end || v < 0 ? -1 : (int)(v & 0xFF);
}

int main(int argc, char **argv)
{
    static char line[LINE_MAX_], ctl_path[4200], settings[LINE_MAX_];
    for (size_t i = 0; i < N_FORWARDED; i++) handle(forwarded[i], on_forwarded);
    handle(SIGTSTP, on_tstp);
    if (paths(ctl_path, sizeof ctl_path) < 0) {
        write_all(2, "offloadfs: cannot find this shim's path\n", 41);
        return FAILED;
    }
    int ctl = open(ctl_path, O_RDWR | O_CLOEXEC);
    if (ctl < 0) {
        say("cannot open ", ctl_path, ": ", strerror(errno), NULL);
        return FAILED;
    }
    size_t len;
    char *req = request(argc, argv, &len);
    if (!req || write_all(ctl, req, len) < 0) {
        say("cannot write to ", ctl_path, ": ", strerror(errno), NULL);
        return FAILED;
    }
    free(req);
    size_t have = 0;
    for (;;) {
        char *nl = memchr(line, '\n', have);
        if (!nl) {
            ssize_t k = have < sizeof line ? read(ctl, line + have, sizeof line - have) : -1;
            if (k > 0) { have += (size_t)k; continue; }
            break;   /* EOF or an error: the mount is gone */
        }
        *nl = 0;
        char *word = line, *arg = strchr(line, ' ');
        if (arg) *arg++ = 0; else arg = nl;
        int status;
        if (strcmp(word, "t") == 0) {
            strncpy(settings, arg, sizeof settings - 1);
        } else if (strcmp(word, "z") == 0) {
            stop_with(ctl, arg);
        } else if (strcmp(word, "x") == 0) {
            return run_local(ctl, arg, argv);
        } else if (strcmp(word, "s") == 0) {
            return die_of(ctl, arg);
        } else if ((status = status_of(word)) >= 0) {
            close(ctl);
            return status;
        } else {
            say("unexpected reply from the mount: ", word, NULL);
            return FAILED;
        }
        size_t used = (size_t)(nl + 1 - line);
        memmove(line, nl + 1, have - used);
        have -= used;
    }
    if (settings[0]) restore_terminal(settings);
    if (!have) say("the offloadfs mount went away while it ran", NULL);
    return FAILED;
}
