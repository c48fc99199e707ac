/*
 * cakework-init: PID 1 inside every microVM (static, runs from the initramfs).
 *
 * It mounts the image disk (erofs, read-only) under an overlay whose upper layer lives on the VM's own
 * scratch disk, configures the network, reads the run configuration from the host over the
 * `cw.control` virtio-serial port, runs the workload chrooted into the overlay with its stdout and
 * stderr on the `cw.stdout` / `cw.stderr` ports, reaps every zombie, reports the exit status on the
 * control port and reboots (QEMU runs with -no-reboot, so that ends the VM).
 *
 * Written in C because it must be a small static binary with no runtime in the guest.
 *
 * Control protocol (lines on cw.control):
 *   host -> guest: the config block (see read_config), then commands: "stop", "time <epoch_ms>", "seed <hex>"
 *   guest -> host: "started <pid>", "exit <code>", "signal <n>", "oom", "error <text>"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/reboot.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ARGS 4096
#define MAX_ENV 4096
#define CONFIG_MAX (4 << 20)

static int control_fd = -1;

static void say(const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  if (control_fd >= 0) {
    ssize_t w = write(control_fd, buf, n);
    (void)w;
  }
}

static void console(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "cakework-init: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
}

static void power_off(void) {
  sync();
  reboot(LINUX_REBOOT_CMD_RESTART); /* -no-reboot turns this into QEMU exiting */
  for (;;) pause();
}

static void fatal(const char *what) {
  console("fatal: %s: %s", what, strerror(errno));
  say("error %s: %s", what, strerror(errno));
  power_off();
}

static void mkdirs(const char *path) {
  char tmp[512];
  snprintf(tmp, sizeof tmp, "%s", path);
  for (char *p = tmp + 1; *p; p++) {
    if (*p == '/') {
      *p = 0;
      mkdir(tmp, 0755);
      *p = '/';
    }
  }
  mkdir(tmp, 0755);
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
  mkdirs(dst);
  if (mount(src, dst, type, flags, data) != 0) {
    char what[600];
    snprintf(what, sizeof what, "mount %s on %s (%s)", src, dst, type);
    fatal(what);
  }
}

/*
 * Finds the device under `dir` (a sysfs class directory) whose attribute file `attr` holds `value`,
 * and writes its /dev path to `out`: disks by the virtio-blk serial the host set, virtio-serial ports
 * by their name.
 */
static int find_device(const char *dir, const char *attr, const char *value, char *out, size_t outlen) {
  DIR *d = opendir(dir);
  if (!d) return -1;
  struct dirent *e;
  int found = -1;
  while (found != 0 && (e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char p[600], buf[64] = {0};
    snprintf(p, sizeof p, "%s/%s/%s", dir, e->d_name, attr);
    int fd = open(p, O_RDONLY);
    if (fd < 0) continue;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) continue;
    buf[strcspn(buf, "\n")] = 0;
    if (strcmp(buf, value) == 0) {
      snprintf(out, outlen, "/dev/%.200s", e->d_name);
      found = 0;
    }
  }
  closedir(d);
  return found;
}

static int find_disk(const char *serial, char *out, size_t outlen) {
  return find_device("/sys/block", "serial", serial, out, outlen);
}

static int find_port(const char *name, char *out, size_t outlen) {
  return find_device("/sys/class/virtio-ports", "name", name, out, outlen);
}

static int open_port(const char *name, int flags) {
  char dev[300];
  for (int i = 0; i < 500; i++) {
    if (find_port(name, dev, sizeof dev) == 0) {
      int fd = open(dev, flags | O_CLOEXEC);
      if (fd >= 0) return fd;
    }
    usleep(2000);
  }
  return -1;
}

/* ---------- configuration from the host ---------- */

struct config {
  char *argv[MAX_ARGS + 1];
  int argc;
  char *env[MAX_ENV + 1];
  int envc;
  char *cwd;
  char *user;
  char *hostname;
  char *ip;      /* guest address, e.g. 10.213.0.2 */
  char *gateway; /* host side of the link */
  int prefix;
  long long time_ms;
};

static char *config_buf;
static size_t config_len;

/*
 * The config is a sequence of NUL-terminated key and value strings ending with the key "end":
 *   time <ms> | arg <s> (repeated) | env <K=V> (repeated) | cwd <dir> | user <spec> | hostname <s>
 *   ip <addr> | gateway <addr> | prefix <n>
 * A read before the host has connected returns EOF, so reading retries until the block is complete.
 */
static void read_config(struct config *c) {
  config_buf = malloc(CONFIG_MAX);
  if (!config_buf) fatal("malloc");
  for (int idle = 0;;) {
    ssize_t n = read(control_fd, config_buf + config_len, CONFIG_MAX - 1 - config_len);
    if (n > 0) {
      config_len += n;
      idle = 0;
      /* complete when the buffer ends with "end\0" as a key at a record boundary */
      size_t i = 0;
      int is_key = 1, done = 0;
      while (i < config_len) {
        char *s = config_buf + i;
        size_t l = strnlen(s, config_len - i);
        if (i + l >= config_len) break; /* unterminated string */
        if (is_key && strcmp(s, "end") == 0) {
          done = 1;
          break;
        }
        is_key = !is_key;
        i += l + 1;
      }
      if (done) break;
      if (config_len >= CONFIG_MAX - 1) {
        errno = E2BIG;
        fatal("config");
      }
    } else {
      if (n < 0 && errno != EAGAIN && errno != EINTR) fatal("read config");
      usleep(idle < 100 ? 1000 : 10000);
      if (++idle > 6000) {
        errno = ETIMEDOUT;
        fatal("waiting for config");
      }
    }
  }
  memset(c, 0, sizeof *c);
  c->prefix = 30;
  size_t i = 0;
  while (i < config_len) {
    char *k = config_buf + i;
    i += strlen(k) + 1;
    if (strcmp(k, "end") == 0) break;
    char *v = config_buf + i;
    i += strlen(v) + 1;
    if (strcmp(k, "arg") == 0 && c->argc < MAX_ARGS) c->argv[c->argc++] = v;
    else if (strcmp(k, "env") == 0 && c->envc < MAX_ENV) c->env[c->envc++] = v;
    else if (strcmp(k, "cwd") == 0) c->cwd = v;
    else if (strcmp(k, "user") == 0) c->user = v;
    else if (strcmp(k, "hostname") == 0) c->hostname = v;
    else if (strcmp(k, "ip") == 0) c->ip = v;
    else if (strcmp(k, "gateway") == 0) c->gateway = v;
    else if (strcmp(k, "prefix") == 0) c->prefix = atoi(v);
    else if (strcmp(k, "time") == 0) c->time_ms = atoll(v);
  }
}

static void set_time(long long ms) {
  if (ms <= 0) return;
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  settimeofday(&tv, NULL);
}

/* Mixes host randomness (hex) into the guest pool: every restore of a snapshot starts from one RNG state. */
static void reseed(const char *hex) {
  unsigned char buf[128];
  size_t n = 0;
  for (; n < sizeof buf && hex[2 * n] && hex[2 * n + 1]; n++) {
    unsigned int b;
    if (sscanf(hex + 2 * n, "%2x", &b) != 1) break;
    buf[n] = (unsigned char)b;
  }
  int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t w = write(fd, buf, n);
  (void)w;
  close(fd);
}

/* ---------- network ---------- */

static void if_up(int s, const char *name) {
  struct ifreq ifr = {0};
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    ioctl(s, SIOCSIFFLAGS, &ifr);
  }
}

static void set_addr(int s, const char *name, unsigned long req, const char *addr) {
  struct ifreq ifr = {0};
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  sin->sin_family = AF_INET;
  inet_pton(AF_INET, addr, &sin->sin_addr);
  if (ioctl(s, req, &ifr) != 0) console("ioctl %lx on %s: %s", req, name, strerror(errno));
}

static void setup_network(const struct config *c) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return;
  if_up(s, "lo");
  if (c->ip && c->gateway) {
    char mask[32];
    unsigned int m = c->prefix <= 0 ? 0 : 0xffffffffu << (32 - c->prefix);
    snprintf(mask, sizeof mask, "%u.%u.%u.%u", m >> 24, (m >> 16) & 255, (m >> 8) & 255, m & 255);
    set_addr(s, "eth0", SIOCSIFADDR, c->ip);
    set_addr(s, "eth0", SIOCSIFNETMASK, mask);
    if_up(s, "eth0");
    struct rtentry rt = {0};
    struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst;
    struct sockaddr_in *gw = (struct sockaddr_in *)&rt.rt_gateway;
    struct sockaddr_in *msk = (struct sockaddr_in *)&rt.rt_genmask;
    dst->sin_family = gw->sin_family = msk->sin_family = AF_INET;
    inet_pton(AF_INET, c->gateway, &gw->sin_addr);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = "eth0";
    if (ioctl(s, SIOCADDRT, &rt) != 0) console("default route: %s", strerror(errno));
  }
  close(s);
}

/* ---------- user resolution inside the image ---------- */

/*
 * Finds an entry of an /etc/passwd- or /etc/group-style file of the image, by name or (when `by_id`)
 * by its numeric id, and returns its id, gid (field 4) and home (field 6) where the file has them.
 */
static int lookup(const char *file, const char *key, int by_id, long *id, long *gid, char **home) {
  FILE *f = fopen(file, "re");
  if (!f) return -1;
  char line[1024];
  int found = -1;
  while (fgets(line, sizeof line, f)) {
    char *fields[7] = {0};
    int n = 0;
    /* split on ':' keeping empty fields */
    for (char *p = line; n < 7;) {
      fields[n++] = p;
      char *c = strpbrk(p, ":\n");
      if (!c) break;
      int last = *c == '\n';
      *c = 0;
      if (last) break;
      p = c + 1;
    }
    if (n < 3) continue;
    if (by_id ? strcmp(fields[2], key) != 0 : strcmp(fields[0], key) != 0) continue;
    *id = atol(fields[2]);
    if (gid && n >= 4) *gid = atol(fields[3]);
    if (home && n >= 6 && *fields[5]) *home = strdup(fields[5]);
    found = 0;
    break;
  }
  fclose(f);
  return found;
}

static int numeric(const char *s) {
  if (!*s) return 0;
  for (; *s; s++)
    if (*s < '0' || *s > '9') return 0;
  return 1;
}

/* Applies an image `User` ("name", "uid", "name:group", "uid:gid"); runs inside the chroot. */
static int apply_user(const char *spec, char **home) {
  if (!spec || !*spec) return 0;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", spec);
  char *group = strchr(buf, ':');
  if (group) *group++ = 0;
  long uid = 0, gid = -1;
  if (numeric(buf)) {
    /* a uid need not be in /etc/passwd; when it is, its group and home apply */
    uid = atol(buf);
    lookup("/etc/passwd", buf, 1, &uid, &gid, home);
  } else if (lookup("/etc/passwd", buf, 0, &uid, &gid, home) != 0) {
    fprintf(stderr, "cakework: user \"%s\" not found in the image's /etc/passwd\n", buf);
    return -1;
  }
  if (group) {
    if (numeric(group)) gid = atol(group);
    else if (lookup("/etc/group", group, 0, &gid, NULL, NULL) != 0) {
      fprintf(stderr, "cakework: group \"%s\" not found in the image's /etc/group\n", group);
      return -1;
    }
  }
  if (gid < 0) gid = uid;
  gid_t g = (gid_t)gid;
  if (setgroups(1, &g) != 0 || setgid(g) != 0 || setuid((uid_t)uid) != 0) {
    fprintf(stderr, "cakework: cannot switch to user %s: %s\n", spec, strerror(errno));
    return -1;
  }
  return 0;
}

/* ---------- the workload ---------- */

static pid_t start_workload(struct config *c, int out_fd, int err_fd) {
  pid_t pid = fork();
  if (pid < 0) fatal("fork");
  if (pid > 0) return pid;

  setsid();
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  int devnull = open("/dev/null", O_RDWR);
  dup2(devnull, 0);
  dup2(out_fd, 1);
  dup2(err_fd, 2);
  if (chroot("/mnt/root") != 0 || chdir("/") != 0) {
    fprintf(stderr, "cakework: chroot: %s\n", strerror(errno));
    _exit(127);
  }
  char *home = NULL;
  if (apply_user(c->user, &home) != 0) _exit(126);
  const char *cwd = c->cwd && *c->cwd ? c->cwd : "/";
  if (chdir(cwd) != 0) {
    fprintf(stderr, "cakework: working directory %s: %s\n", cwd, strerror(errno));
    _exit(126);
  }
  /* The image's environment (already merged with envVars by the host) becomes the process's. */
  clearenv();
  for (int i = 0; i < c->envc; i++) putenv(c->env[i]);
  if (!getenv("PATH")) setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
  if (!getenv("HOME")) setenv("HOME", home ? home : "/", 1);
  if (c->hostname && !getenv("HOSTNAME")) setenv("HOSTNAME", c->hostname, 1);
  if (c->argc == 0) {
    fprintf(stderr, "cakework: the image has no Entrypoint or Cmd to run\n");
    _exit(127);
  }
  c->argv[c->argc] = NULL;
  execvp(c->argv[0], c->argv);
  fprintf(stderr, "cakework: cannot run %s: %s\n", c->argv[0], strerror(errno));
  _exit(errno == ENOENT ? 127 : 126);
}

/*
 * The kernel log, read from where it stood when the workload started: an OOM kill leaves an
 * "Out of memory: Killed process" record there (tinyconfig kernels have no oom_kill vmstat counter).
 */
static int kmsg_fd = -1;

static void kmsg_open(void) {
  kmsg_fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (kmsg_fd >= 0) lseek(kmsg_fd, 0, SEEK_END);
}

static int kmsg_saw_oom(void) {
  if (kmsg_fd < 0) return 0;
  char rec[2048];
  int oom = 0;
  for (;;) {
    ssize_t n = read(kmsg_fd, rec, sizeof rec - 1);
    if (n < 0 && errno == EPIPE) continue; /* records were overwritten: keep reading */
    if (n <= 0) break;
    rec[n] = 0;
    if (strstr(rec, "Out of memory") || strstr(rec, "oom-kill") || strstr(rec, "Killed process")) oom = 1;
  }
  return oom;
}

int main(void) {
  /* initramfs: make the basic mounts ourselves */
  mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  int cfd = open("/dev/console", O_RDWR);
  if (cfd >= 0) {
    dup2(cfd, 1);
    dup2(cfd, 2);
    if (cfd > 2) close(cfd);
  }

  control_fd = open_port("cw.control", O_RDWR);
  if (control_fd < 0) fatal("open control port");
  struct config cfg;
  read_config(&cfg);
  set_time(cfg.time_ms);
  if (cfg.hostname) sethostname(cfg.hostname, strlen(cfg.hostname));

  char image[300], scratch[300];
  if (find_disk("image", image, sizeof image) != 0) fatal("no image disk");
  if (find_disk("scratch", scratch, sizeof scratch) != 0) fatal("no scratch disk");
  must_mount(image, "/mnt/lower", "erofs", MS_RDONLY, NULL);
  /* noinit_itable: no background zeroing of inode tables, a disk that lives as long as the VM never needs it */
  must_mount(scratch, "/mnt/scratch", "ext4", MS_NOATIME, "noinit_itable");
  mkdirs("/mnt/scratch/upper");
  mkdirs("/mnt/scratch/work");
  must_mount("overlay", "/mnt/root", "overlay", 0,
             "lowerdir=/mnt/lower,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work");
  must_mount("proc", "/mnt/root/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  must_mount("sysfs", "/mnt/root/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL);
  must_mount("devtmpfs", "/mnt/root/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  must_mount("devpts", "/mnt/root/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
  must_mount("tmpfs", "/mnt/root/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  setup_network(&cfg);

  int out_fd = open_port("cw.stdout", O_WRONLY);
  int err_fd = open_port("cw.stderr", O_WRONLY);
  if (out_fd < 0 || err_fd < 0) fatal("open output ports");

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigprocmask(SIG_BLOCK, &mask, NULL);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);

  kmsg_open();
  pid_t main_pid = start_workload(&cfg, out_fd, err_fd);
  close(out_fd);
  close(err_fd);
  say("started %d", (int)main_pid);

  int main_status = -1;
  char line[512];
  size_t line_len = 0;
  while (main_status < 0) {
    struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN}, {.fd = control_fd, .events = POLLIN}};
    if (poll(fds, 2, -1) < 0 && errno != EINTR) break;
    if (fds[0].revents & POLLIN) {
      struct signalfd_siginfo si;
      while (read(sfd, &si, sizeof si) == sizeof si) {
        if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) kill(-main_pid, SIGTERM);
      }
      int st;
      pid_t p;
      while ((p = waitpid(-1, &st, WNOHANG)) > 0)
        if (p == main_pid) main_status = st;
    }
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = read(control_fd, line + line_len, sizeof line - 1 - line_len);
      if (n > 0) {
        line_len += n;
        char *nl;
        while ((nl = memchr(line, '\n', line_len))) {
          *nl = 0;
          if (strcmp(line, "stop") == 0) kill(-main_pid, SIGTERM);
          else if (strncmp(line, "time ", 5) == 0) set_time(atoll(line + 5));
          else if (strncmp(line, "seed ", 5) == 0) reseed(line + 5);
          size_t used = nl + 1 - line;
          memmove(line, nl + 1, line_len - used);
          line_len -= used;
        }
        if (line_len >= sizeof line - 1) line_len = 0;
      } else {
        usleep(10000); /* host side disconnected: keep the workload running */
      }
    }
  }

  if (WIFEXITED(main_status)) {
    say("exit %d", WEXITSTATUS(main_status));
  } else if (WIFSIGNALED(main_status)) {
    if (WTERMSIG(main_status) == SIGKILL && kmsg_saw_oom()) say("oom");
    else say("signal %d", WTERMSIG(main_status));
  }
  /* Whatever the workload left behind goes too. */
  kill(-1, SIGKILL);
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  umount2("/mnt/root", MNT_DETACH);
  umount2("/mnt/scratch", MNT_DETACH);
  power_off();
  return 0;
}
