# offloadfs: `make demo` and `make test` work on a fresh Debian machine as root.
# Debian's python3 by default: jobs' callers run offld as themselves, so the venv's interpreter
# must be one every user can run (a pyenv build under /root, mode 0700, is not).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
# Debian packages: FUSE (libfuse3-3 for mfusepy, libfuse2 for the fusepy fallback, fuse3 for
# fusermount), the real ImageMagick, attr (getfattr/setfattr), shellcheck and systemd-analyze
# for the hooks, nfs-ganesha (the VM's userspace NFS server) and libnfs (the host's userspace
# NFS client, through ctypes), gcc, libc6-dev and python3-dev (the venv's install builds
# daemon/_spawn.c, the job's spawn by vfork, and offloadfs/_shim.c, the shim program, static
# with libc6-dev's libc.a; without them offloadd starts jobs by fork, and mounts serve sh
# scripts).
APT_PKGS := python3-venv fuse3 libfuse3-3 libfuse2 imagemagick attr shellcheck systemd nfs-ganesha nfs-ganesha-vfs libnfs13 libnfs-utils gcc libc6-dev python3-dev
# What the guest scenarios of `make test` also need (tests/system/test_guest.py, scripts/vm):
# QEMU, qemu-img, mmdebstrap (the guest image from Debian's packages), socat (guestfwd relays).
GUEST_APT_PKGS := qemu-system-x86 qemu-utils mmdebstrap socat
# ... and the shaped-network rig of bench thesis (tests/system/test_thesis.py): ip, tc, nsenter,
# and cc for its clock probe.
# ... and the Debian package's build (make deb; tests/system/test_package.py builds it and
# installs it in a chroot made with mmdebstrap).
DEB_APT_PKGS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-all-dev python3-setuptools python3-wheel
TEST_APT_PKGS := $(GUEST_APT_PKGS) iproute2 util-linux gcc libc6-dev $(DEB_APT_PKGS)
# What `make bench` also needs (not `make test`): fio (the I/O benchmark), openssh-server and
# openssh-client (ssh on loopback, compared with the shim), distcc with gcc (compared with gcc
# through the shim; bench thesis's clock probe), util-linux (findmnt: where a job's cwd lives;
# nsenter), iproute2 (ip and tc: bench thesis's namespaces and shaped link), make (bench
# build: Debian's zlib source, configure && make -j2 && make check, locally and through shims).
BENCH_APT_PKGS := fio openssh-server openssh-client distcc gcc libc6-dev util-linux iproute2 make

.PHONY: install apt venv demo test unit lint bench dist deb docs clean

install: apt venv

apt:
	@scripts/apt-install $(APT_PKGS)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py pyproject.toml daemon/_spawn.c offloadfs/_shim.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	@# The editable install's import finder costs every Python start here ~20 ms of CPU (offld,
	@# the shims' mount, the daemons; issue 16), and editable_mode=compat cannot map offloadd to
	@# daemon/: a plain path entry instead, the root and a link offloadd -> daemon (new modules
	@# are still seen at once).
	mkdir -p $(VENV)/src && ln -sfn $(CURDIR)/daemon $(VENV)/src/offloadd
	printf '%s\n' $(CURDIR) $(CURDIR)/$(VENV)/src > \
		$$(ls $(VENV)/lib/python3*/site-packages/__editable__.offloadfs-*.pth)
	touch $@

demo: install
	scripts/demo

test: install
	@scripts/apt-install $(TEST_APT_PKGS)
	$(VENV)/bin/pytest -q

# The fast unit tests alone (no processes, mounts or sockets): no Debian packages needed.
unit: venv
	$(VENV)/bin/pytest -q tests/unit

# ruff (configured in pyproject.toml) over the package, the daemon, the tests and bench.
lint: venv
	$(VENV)/bin/ruff check .

# Every benchmark, then bench/results/RESULTS.md (tables, machine, date, command) and the PNGs.
# py-spy profiles the streaming path (where the time goes when a target is missed).
bench: install
	@scripts/apt-install $(BENCH_APT_PKGS)
	@test -x $(VENV)/bin/py-spy || $(VENV)/bin/pip install -q py-spy
	$(VENV)/bin/python -m bench all

# The sdist and the wheel (built from the sdist) in dist/.
dist: venv
	$(VENV)/bin/python -m build --no-isolation --outdir dist .

# The Debian package in dist/ (debhelper and pybuild, from the sdist; hooks/debian).
deb: venv
	@scripts/apt-install $(DEB_APT_PKGS)
	scripts/build-deb dist

# The man pages and completions (hooks/man, hooks/completion) again from the parsers.
docs: venv
	$(VENV)/bin/python scripts/gen_docs.py

clean:
	rm -rf $(VENV) build dist *.egg-info demo
