# offloadfs: `make demo` and `make test` work on a fresh Debian machine as root.
PYTHON ?= python3
VENV   := .venv
# Debian packages: FUSE (libfuse2 for fusepy, fuse3 for fusermount), the real ImageMagick,
# attr (getfattr/setfattr), shellcheck and systemd-analyze for the hooks, nfs-ganesha (the
# VM's userspace NFS server) and libnfs (the host's userspace NFS client, through ctypes).
APT_PKGS := fuse3 libfuse2 imagemagick attr shellcheck systemd nfs-ganesha nfs-ganesha-vfs libnfs13 libnfs-utils

.PHONY: install apt venv demo test bench clean

install: apt venv

apt:
	@scripts/apt-install $(APT_PKGS)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

demo: install
	scripts/demo

test: install
	$(VENV)/bin/pytest -q

bench: install
	$(VENV)/bin/python -m bench all

clean:
	rm -rf $(VENV) build *.egg-info demo
