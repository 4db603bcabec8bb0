/* offloadd._spawn: a job's spawn by vfork, confined between the vfork and the job's exec.
 *
 * runner.py calls spawn() from the server's loop thread; it is what runner._confiner and
 * CPython's fork path do, without the fork (whose cost grows with the daemon's memory, and
 * which CPython 3.11 uses whenever a preexec_fn or user/group/extra_groups is given). The
 * child shares the daemon's memory until its exec, and other threads of the daemon run on
 * meanwhile, so it calls no Python, takes no lock, allocates nothing and touches no errno
 * of glibc's other than its own: everything it needs (argv, envp, groups, limits, the
 * refusal texts' parts) is built here before the vfork; the ids are switched with raw
 * syscalls (glibc's setresuid would signal the daemon's threads, whose list the child
 * shares); error texts come from strerrordesc_np (no locale, no lock). All signals are
 * blocked around the vfork, and the child sets every handled signal back to its default
 * before it unblocks them, so no handler of the daemon's runs on its stack.
 *
 * In the child, in the order of CPython's child_exec with runner._confiner as preexec_fn:
 * handlers to default (SIGPIPE and SIGXFSZ too: restore_signals) and the caller's mask back,
 * stdio onto fds 0-2, setsid, setgroups/setresgid/setresuid to the caller, TIOCSCTTY (a
 * terminal's job), chdir as the caller and getcwd inside the tree, setrlimit, no_new_privs,
 * pdeathsig (after the uid switch, which clears it), the getppid check, close every fd but
 * 0-2 and KEEP, execve. A refusal from TIOCSCTTY on is one line on the job's stderr and exit
 * 126 (runner._confiner's texts); a failed id switch or execve comes back as OSError, its
 * errno written into this frame's memory (shared until the exec), after the child is reaped. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define LINE_MAX_ 8192

struct limit { int resource; struct rlimit value; };

struct job {                  /* everything the child needs, built before the vfork */
    const char *path, *cwd, *root;
    char *const *argv, *const *envp;
    int stdio[3], ctty, deathsig, switch_ids;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    Py_ssize_t ngroups, nlimits, nkeep;
    const struct limit *limits;
    const int *keep;          /* sorted, all > 2 */
    pid_t parent;
    sigset_t mask;            /* the caller's signal mask, given back to the job */
};

struct report { volatile int error, stage; };   /* written by the child before it exits */
enum { STAGE_NONE, STAGE_IDS, STAGE_EXEC };

/* --- in the child: a refusal's line, without printf ----------------------------------- */

struct line { char text[LINE_MAX_]; size_t n; };

static void add(struct line *line, const char *text) {
    while (*text && line->n < LINE_MAX_ - 1) line->text[line->n++] = *text++;
}

static void add_number(struct line *line, long long n) {
    char digits[24];
    int i = 0;
    unsigned long long u = n < 0 ? -(unsigned long long)n : (unsigned long long)n;
    do digits[i++] = (char)('0' + u % 10); while ((u /= 10) && i < 23);
    if (n < 0) add(line, "-");
    while (i && line->n < LINE_MAX_ - 1) line->text[line->n++] = digits[--i];
}

static const char *error_text(int error) {
    const char *text = strerrordesc_np(error);
    return text ? text : "error";
}

/* LINE then TEXT, a newline, on the job's stderr; exit 126. */
static void die(struct line *line, const char *text) {
    add(line, text);
    add(line, "\n");
    for (const char *at = line->text; line->n;) {
        ssize_t done = write(2, at, line->n);
        if (done <= 0) break;
        at += done;
        line->n -= (size_t)done;
    }
    _exit(126);
}

/* A line that starts with TEXT. */
static struct line *start(struct line *line, const char *text) {
    line->n = 0;
    add(line, text);
    return line;
}

static void fail(struct report *report, int stage) {
    report->error = errno;
    report->stage = stage;
    _exit(255);
}

static void reset_signals(const sigset_t *mask) {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < _NSIG; sig++) {   /* glibc's own (EINVAL) and KILL, STOP: skipped */
        struct sigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) != 0)
            continue;
        if (sig == SIGPIPE || sig == SIGXFSZ || (sa.sa_handler != SIG_IGN && sa.sa_handler != SIG_DFL))
            sigaction(sig, &dfl, NULL);
    }
    pthread_sigmask(SIG_SETMASK, mask, NULL);
}

static int set_stdio(const struct job *job) {
    int fds[3];
    for (int i = 0; i < 3; i++) {   /* one that is 0-2 but not its place: out of the way first */
        fds[i] = job->stdio[i];
        if (fds[i] < 3 && fds[i] != i && (fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3)) < 0)
            return -1;
    }
    for (int i = 0; i < 3; i++)
        if (fds[i] == i ? fcntl(i, F_SETFD, 0) : dup2(fds[i], i) < 0)
            return -1;
    return 0;
}

static void enter(const struct job *job, struct line *line) {
    char here[PATH_MAX];
    long long uid = (long long)getuid();
    if (chdir(job->cwd) != 0 || !getcwd(here, sizeof here)) {
        int error = errno;
        add(start(line, "offloadd: cannot enter "), job->cwd);
        add(line, " as uid ");
        add_number(line, uid);
        add(line, ": ");
        die(line, error_text(error));
    }
    if (!job->root)
        return;
    size_t r = strlen(job->root);
    while (r > 1 && job->root[r - 1] == '/') r--;
    if (strncmp(here, job->root, r) == 0 && (here[r] == '\0' || here[r] == '/' || r == 1))
        return;
    add(start(line, "offloadd: cannot run in "), job->cwd);
    add(line, " as uid ");
    add_number(line, uid);
    add(line, ": it is ");
    add(line, here);
    add(line, ", outside ");
    die(line, job->root);
}

static void close_fds(const struct job *job) {
    unsigned int from = 3;
    for (Py_ssize_t i = 0; i <= job->nkeep; i++) {
        unsigned int to = i < job->nkeep ? (unsigned int)job->keep[i] : ~0U;
        if (to > from)
            syscall(SYS_close_range, from, to - 1, 0);
        if (i < job->nkeep) {
            fcntl(job->keep[i], F_SETFD, 0);
            from = to + 1;
        }
    }
}

static void child(const struct job *job, struct report *report) {
    struct line line;
    reset_signals(&job->mask);
    if (set_stdio(job) != 0 || setsid() < 0)
        fail(report, STAGE_IDS);
    if (job->switch_ids &&
        (syscall(SYS_setgroups, (size_t)job->ngroups, job->groups) != 0 ||
         syscall(SYS_setresgid, job->gid, job->gid, job->gid) != 0 ||
         syscall(SYS_setresuid, job->uid, job->uid, job->uid) != 0))
        fail(report, STAGE_IDS);
    if (job->ctty >= 0 && ioctl(job->ctty, TIOCSCTTY, 0) != 0)
        die(start(&line, "offloadd: cannot give the job its terminal: "), error_text(errno));
    enter(job, &line);
    for (Py_ssize_t i = 0; i < job->nlimits; i++)
        if (setrlimit(job->limits[i].resource, &job->limits[i].value) != 0) {
            add_number(start(&line, "offloadd: cannot set resource limit "),
                       job->limits[i].resource);
            add(&line, " to ");
            add_number(&line, (long long)job->limits[i].value.rlim_cur);
            die(&line, "");
        }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        add_number(start(&line, "offloadd: cannot set no_new_privs (errno "), errno);
        die(&line, ")");
    }
    if (prctl(PR_SET_PDEATHSIG, job->deathsig, 0, 0, 0) != 0) {
        add_number(start(&line, "offloadd: cannot set the parent death signal (errno "), errno);
        die(&line, ")");
    }
    if (getppid() != job->parent)
        die(start(&line, "offloadd: offloadd went away before the job started"), "");
    close_fds(job);
    execve(job->path, job->argv, job->envp);
    fail(report, STAGE_EXEC);
}

/* --- in the daemon: the arguments, the vfork, the report ------------------------------- */

/* The vfork in a frame of its own, which the child never returns to (nothing of the
 * caller's frame can be clobbered by the child's run on the shared stack). */
static __attribute__((noinline)) pid_t start_child(const struct job *job, struct report *report) {
    pid_t pid = vfork();
    if (pid == 0)
        child(job, report);   /* does not return */
    return pid;
}

static void free_strings(char **strings, PyObject **owners, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(owners[i]);
    PyMem_Free(owners);
    PyMem_Free(strings);
}

/* A NULL-terminated char* array of the bytes-like (or str) items of SEQ; OWNERS keeps them. */
static char **strings_of(PyObject *seq, PyObject ***owners, Py_ssize_t *count) {
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of bytes");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **strings = PyMem_Calloc((size_t)n + 1, sizeof *strings);
    *owners = PyMem_Calloc((size_t)n + 1, sizeof **owners);
    *count = 0;
    if (!strings || !*owners) {
        PyMem_Free(strings);
        PyMem_Free(*owners);
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(fast, i), &(*owners)[i])) {
            free_strings(strings, *owners, i);
            Py_DECREF(fast);
            return NULL;
        }
        strings[i] = PyBytes_AS_STRING((*owners)[i]);
        *count = i + 1;
    }
    Py_DECREF(fast);
    return strings;
}

/* Fill an int array from a sequence of ints (N items). */
static int ints_of(PyObject *seq, long *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(seq, i);
        if (!item) return -1;
        out[i] = PyLong_AsLong(item);
        Py_DECREF(item);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static int fill_job(struct job *job, PyObject *stdio, PyObject *ids, PyObject *limits,
                    PyObject *keep, gid_t **groups, struct limit **lims, int **kept) {
    long values[3];
    if (PySequence_Size(stdio) != 3) {
        PyErr_SetString(PyExc_ValueError, "stdio: three fds");
        return -1;
    }
    if (ints_of(stdio, values, 3)) return -1;
    for (int i = 0; i < 3; i++) job->stdio[i] = (int)values[i];
    job->switch_ids = ids != Py_None;
    if (job->switch_ids) {
        PyObject *list;
        long uid, gid;
        if (!PyArg_ParseTuple(ids, "llO", &uid, &gid, &list)) return -1;
        job->uid = (uid_t)uid;
        job->gid = (gid_t)gid;
        if ((job->ngroups = PySequence_Size(list)) < 0) return -1;
        long *g = PyMem_Calloc((size_t)job->ngroups + 1, sizeof *g);
        *groups = PyMem_Calloc((size_t)job->ngroups + 1, sizeof **groups);
        if (!g || !*groups || ints_of(list, g, job->ngroups)) {
            PyMem_Free(g);
            return g && *groups ? -1 : (PyErr_NoMemory(), -1);
        }
        for (Py_ssize_t i = 0; i < job->ngroups; i++) (*groups)[i] = (gid_t)g[i];
        PyMem_Free(g);
        job->groups = *groups;
    }
    if ((job->nlimits = PySequence_Size(limits)) < 0) return -1;
    *lims = PyMem_Calloc((size_t)job->nlimits + 1, sizeof **lims);
    if (!*lims) return PyErr_NoMemory(), -1;
    for (Py_ssize_t i = 0; i < job->nlimits; i++) {
        PyObject *item = PySequence_GetItem(limits, i);
        int res;
        unsigned long long soft, hard;
        int ok = item && PyArg_ParseTuple(item, "iKK", &res, &soft, &hard);
        Py_XDECREF(item);
        if (!ok) return -1;
        (*lims)[i] = (struct limit){res, {(rlim_t)soft, (rlim_t)hard}};
    }
    job->limits = *lims;
    if ((job->nkeep = PySequence_Size(keep)) < 0) return -1;
    long *k = PyMem_Calloc((size_t)job->nkeep + 1, sizeof *k);
    *kept = PyMem_Calloc((size_t)job->nkeep + 1, sizeof **kept);
    if (!k || !*kept) {
        PyMem_Free(k);
        return PyErr_NoMemory(), -1;
    }
    int bad = ints_of(keep, k, job->nkeep);
    for (Py_ssize_t i = 0; !bad && i < job->nkeep; i++) {
        (*kept)[i] = (int)k[i];
        if (k[i] < 3 || (i && k[i] <= k[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "keep: ascending fds above 2");
            bad = -1;
        }
    }
    PyMem_Free(k);
    job->keep = *kept;
    return bad;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, stdio, ids, cwd, root, limits, ctty, deathsig, keep) -> pid\n\n"
"Start PATH (bytes, absolute) with ARGV and ENVP (lists of bytes) by vfork, in a new\n"
"session, STDIO (three fds) as its 0-2; as IDS = (uid, gid, groups) unless None; entering\n"
"CWD as that user, which must be ROOT or below it unless ROOT is None; LIMITS a list of\n"
"(resource, soft, hard); CTTY an fd to make its terminal or -1; DEATHSIG its signal when\n"
"this thread ends; every fd but 0-2 and KEEP (ascending) closed. Raise OSError for a\n"
"failed id switch or execve (the child reaped); a refusal of the confinement is a line on\n"
"the job's stderr and its exit 126.");

static PyObject *spawn(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *path_arg, *path_o = NULL, *cwd_o = NULL, *root_o = NULL, *argv_seq, *env_seq, *stdio,
             *ids, *limits, *keep, **argv_own = NULL, **env_own = NULL, *result = NULL;
    char **argv = NULL, **envp = NULL;
    Py_ssize_t nargv = 0, nenv = 0;
    int ctty, deathsig;
    gid_t *groups = NULL;
    struct limit *lims = NULL;
    int *kept = NULL;
    struct job job;
    memset(&job, 0, sizeof job);
    if (!PyArg_ParseTuple(args, "OOOOOO&OOiiO", &path_arg, &argv_seq, &env_seq, &stdio, &ids,
                          PyUnicode_FSConverter, &cwd_o, &root_o, &limits, &ctty, &deathsig,
                          &keep))
        return NULL;
    PyObject *root_b = NULL;
    if (!PyUnicode_FSConverter(path_arg, &path_o) ||
        (root_o != Py_None && !PyUnicode_FSConverter(root_o, &root_b)))
        goto done;
    if (!(argv = strings_of(argv_seq, &argv_own, &nargv)) ||
        !(envp = strings_of(env_seq, &env_own, &nenv)))
        goto done;
    if (fill_job(&job, stdio, ids, limits, keep, &groups, &lims, &kept))
        goto done;
    job.path = PyBytes_AS_STRING(path_o);
    job.cwd = PyBytes_AS_STRING(cwd_o);
    job.root = root_b ? PyBytes_AS_STRING(root_b) : NULL;
    job.argv = argv;
    job.envp = envp;
    job.ctty = ctty;
    job.deathsig = deathsig;
    job.parent = getpid();

    struct report report = {0, STAGE_NONE};
    sigset_t all;
    sigfillset(&all);
    pid_t pid;
    int status;
    Py_BEGIN_ALLOW_THREADS
    pthread_sigmask(SIG_BLOCK, &all, &job.mask);
    pid = start_child(&job, &report);
    int error = errno;
    pthread_sigmask(SIG_SETMASK, &job.mask, NULL);
    if (pid > 0 && report.stage != STAGE_NONE)
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    errno = error;
    Py_END_ALLOW_THREADS
    if (pid < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    else if (report.stage != STAGE_NONE) {
        errno = report.error;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError,
                                             report.stage == STAGE_EXEC ? path_arg : NULL);
    } else
        result = PyLong_FromLong(pid);
done:
    if (argv) free_strings(argv, argv_own, nargv);
    if (envp) free_strings(envp, env_own, nenv);
    PyMem_Free(groups);
    PyMem_Free(lims);
    PyMem_Free(kept);
    Py_XDECREF(root_b);
    Py_XDECREF(path_o);
    Py_XDECREF(cwd_o);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "offloadd._spawn",
    "A job's spawn by vfork, confined before its exec (see runner.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
