# Everything sets itself up: a fresh clone with only the machine's base Python needs no other step.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
# System tools the tests drive for real: curl as in the README, file to name the audio,
# redis-server for the shared rate limits and usage stream, promtool to check the metrics scrape,
# chromium (headless) to call the gateway from a web page on another origin (CORS), ffmpeg (and its
# ffprobe) to make real audio files and to say how long they are, npm (and node) for the Node SDK,
# systemd-analyze to verify the installed units.
# Each is a command, or command:package where Debian's package is named otherwise.
SYSTEM_TOOLS := curl file redis-server promtool:prometheus chromium ffmpeg npm systemd-analyze:systemd
# The official openai Node SDK at the version tests/node/package.json pins, installed from npm's
# registry into tests/node/node_modules (gitignored) for tests/test_node_sdk.py.
NODE_SDK := tests/node/node_modules/openai/package.json

.PHONY: run test lint venv system-tools node-sdk clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

node-sdk: $(NODE_SDK)

$(NODE_SDK): tests/node/package.json | system-tools
	npm install --prefix tests/node --no-audit --no-fund --no-package-lock --silent
	touch $@

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; \
	  case " $$missing " in *" prometheus "*) \
	    if [ -d /run/systemd/system ]; then \
	      echo "stopping the Prometheus server that came with promtool (it takes :9090, aisix's metrics port)"; \
	      systemctl disable --now prometheus prometheus-node-exporter 2>/dev/null || true; fi;; \
	  esac; \
	fi

# The gateway on 127.0.0.1:3000 with etc/aisix/, and the development upstream on 127.0.0.1:3001
# that the shipped aliases point at, in one terminal: the upstream labels its every line. Ctrl-C
# stops both.
run: venv
	@echo "make run: the gateway on http://127.0.0.1:3000 (etc/aisix/) and a development upstream on"; \
	echo "http://127.0.0.1:3001. Lines starting 'devupstream |' are the upstream's; all others are the"; \
	echo "gateway's: its log (aisix.access: one line per request) and one JSON usage event per audio"; \
	echo "request. Ctrl-C stops both."; \
	$(BIN)/python -m aisix.devupstream --listen 127.0.0.1:3001 & dev=$$!; \
	trap 'kill $$dev 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python -m aisix serve -c etc/aisix/config.yaml

# The static gate over aisix/ (pyproject.toml: [tool.ruff], [tool.mypy]): both run, either failing
# fails it.
lint: venv
	@status=0; \
	echo "ruff check aisix"; $(BIN)/python -m ruff check aisix || status=1; \
	echo "mypy aisix"; $(BIN)/python -m mypy aisix || status=1; \
	exit $$status

# lint, then the tests. The tests run even when lint fails, so one run shows every failure; make
# test exits non-zero if either failed.
test: venv system-tools node-sdk
	@status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(BIN)/python -m pytest || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see lint and pytest above)"; fi; \
	exit $$status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules

# -- make install: the gateway as a systemd service (as root; docs/operations.md, "Deploy") ------
# A venv of its own in $(PREFIX)/venv made with the base $(PYTHON), the units in $(UNITDIR),
# /etc/aisix/{config,resources}.yaml only where absent (an operator's files are never
# overwritten), the aisix system user and /var/log/aisix. It never enables or starts the service:
# the shipped resources.yaml holds the demo key, so an operator reviews /etc/aisix/ first.
# DESTDIR=/some/root stages everything under that root (packaging, tests): no user is made,
# nothing is chowned, systemctl is not run. A venv is not relocatable: a staged one runs in place.
DESTDIR    ?=
PREFIX     ?= /opt/aisix
SYSCONFDIR ?= /etc/aisix
UNITDIR    ?= /etc/systemd/system
AISIX_USER ?= aisix
UNITS      := etc/systemd/aisix.service etc/systemd/aisix@.service
# The units name /opt/aisix/ and /etc/aisix/; a PREFIX or SYSCONFDIR of another value is written in.
UNIT_PATHS := sed -e 's|/opt/aisix/|$(PREFIX)/|g' -e 's|/etc/aisix/|$(SYSCONFDIR)/|g'

.PHONY: install uninstall

install:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "make install: run as root, or stage it with DESTDIR=/some/dir"; exit 1; fi
	@if [ -z "$(DESTDIR)" ] && ! getent passwd $(AISIX_USER) >/dev/null; then \
	  echo "creating system user $(AISIX_USER)"; \
	  useradd --system --user-group --no-create-home --home-dir /nonexistent \
	    --shell /usr/sbin/nologin $(AISIX_USER); fi
	test -x $(DESTDIR)$(PREFIX)/venv/bin/python || $(PYTHON) -m venv $(DESTDIR)$(PREFIX)/venv
	@# Built from a copy: setuptools' build/ in this tree would keep modules deleted since the
	@# last build and ship them; a copy also leaves the working tree untouched.
	src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	  cp -R setup.cfg pyproject.toml README.md aisix "$$src/" && \
	  $(DESTDIR)$(PREFIX)/venv/bin/python -m pip install --quiet --disable-pip-version-check "$$src"
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/share/doc
	for unit in $(UNITS); do \
	  $(UNIT_PATHS) "$$unit" > $(DESTDIR)$(UNITDIR)/$${unit##*/} && chmod 0644 $(DESTDIR)$(UNITDIR)/$${unit##*/}; done
	install -m 0644 docs/operations.md docs/api.md $(DESTDIR)$(PREFIX)/share/doc/
	@# Readable by the service's group only: resources.yaml holds key hashes, maybe secrets.
	@etc=$(DESTDIR)$(SYSCONFDIR); \
	if [ ! -d "$$etc" ]; then install -d -m 0750 "$$etc" && \
	  { [ -n "$(DESTDIR)" ] || chgrp $(AISIX_USER) "$$etc"; }; fi; \
	for f in config.yaml resources.yaml; do \
	  if [ -e "$$etc/$$f" ]; then echo "kept $$etc/$$f (exists; compare with etc/aisix/$$f)"; \
	  else install -m 0640 etc/aisix/$$f "$$etc/$$f" && echo "installed $$etc/$$f" && \
	    { [ -n "$(DESTDIR)" ] || chgrp $(AISIX_USER) "$$etc/$$f"; }; fi; done; \
	if [ ! -e "$$etc/env" ]; then \
	  printf '%s\n' "# VAR=value lines for \$${VAR} in config.yaml and resources.yaml, e.g." \
	    "# OPENAI_API_KEY=sk-..." "# Read by systemd (EnvironmentFile=) as root: keep it 0600 root:root." \
	    > "$$etc/env" && chmod 0600 "$$etc/env" && echo "installed $$etc/env"; fi
	install -d -m 0750 $(DESTDIR)/var/log/aisix
	@[ -n "$(DESTDIR)" ] || chown $(AISIX_USER):$(AISIX_USER) /var/log/aisix
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	  else echo "systemd is not running here (or DESTDIR is set): run 'systemctl daemon-reload' on the target"; fi
	@echo "next: review $(SYSCONFDIR)/ (the demo key!), then"; \
	echo "  (set -a; . $(SYSCONFDIR)/env; $(PREFIX)/venv/bin/aisix validate -c $(SYSCONFDIR)/config.yaml)"; \
	echo "  systemctl enable --now aisix     (an upgrade: systemctl restart aisix)"

# Removes the program and the units; keeps $(SYSCONFDIR)/, /var/log/aisix and the user.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl stop aisix.service 'aisix@*.service' || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/*.wants/aisix.service $(DESTDIR)$(UNITDIR)/*.wants/aisix@*.service
	rm -f $(DESTDIR)$(UNITDIR)/aisix.service $(DESTDIR)$(UNITDIR)/aisix@.service
	rm -rf $(DESTDIR)$(PREFIX)/venv $(DESTDIR)$(PREFIX)/share/doc/operations.md $(DESTDIR)$(PREFIX)/share/doc/api.md
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "kept $(SYSCONFDIR)/, /var/log/aisix and the user $(AISIX_USER) (userdel $(AISIX_USER) to remove it)"

# Performance (bench/README.md): installs nginx and wrk from Debian's packages when missing, then
# starts everything it measures on 127.0.0.1, bounded in time (~6 min), and prints ratios against
# tuned nginx, the aiohttp ceiling, a raw Python relay and a bare aiohttp relay with PASS/FAIL per
# target. BENCH_SECONDS, BENCH_ROUNDS, ... tune it.
# Then realtime sessions (bench-realtime, ~1-2 min more) unless BENCH_REALTIME=0.
BENCH_REALTIME ?= 1
.PHONY: bench bench-tools bench-realtime
bench-tools:
	@missing=""; for t in nginx wrk ffmpeg; do PATH="$$PATH:/usr/sbin:/sbin" command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: venv bench-tools
	$(BIN)/python bench/run.py
	@if [ "$(BENCH_REALTIME)" = 0 ]; then echo "BENCH_REALTIME=0: realtime sessions not measured"; \
	else echo "$(BIN)/python bench/realtime.py"; $(BIN)/python bench/realtime.py; fi

# Realtime sessions alone (bench/realtime.py, ~2 min): sessions per core at real-time pace, the p99
# delay added to a frame and memory per idle session, aisix against a bare aiohttp WebSocket relay.
# BENCH_RT_SECONDS, BENCH_RT_MAX_SESSIONS, ... tune it (bench/README.md, "Realtime").
bench-realtime: venv
	$(BIN)/python bench/realtime.py

# The audio duration probes alone (bench/probes.py, ~1 min): MiB/s per format, fed real ffmpeg files.
.PHONY: bench-probes
bench-probes: venv system-tools
	$(BIN)/python bench/probes.py

# One change's cost: CPU per request of aisix at AB_REF (default HEAD) against this tree and the
# bare relay, interleaved (bench/README.md, "Measuring one change").
.PHONY: bench-ab
bench-ab: venv bench-tools
	AB_REF=$(or $(REF),HEAD) $(BIN)/python bench/ab.py

# Where aisix spends its CPU under load (bench/profile.py): py-spy samples it under wrk, pinned as
# in the bench. PROFILE_ROUTE=transcription for uploads.
.PHONY: profile
profile: venv bench-tools
	@test -x $(BIN)/py-spy || $(BIN)/pip install -q py-spy
	$(BIN)/python bench/profile.py

# Coverage-guided fuzzing of the multipart rewriter with atheris (fuzz/README.md), for a bounded
# time: FUZZ_SECONDS=600 make soak-fuzz. New inputs and any crash land in FUZZ_DIR;
# AISIX_FUZZ_AIOHTTP=0 skips the aiohttp differential check.
FUZZ_SECONDS ?= 120
FUZZ_AUDIO_SECONDS ?= 60
FUZZ_DIR     ?= /tmp/aisix-fuzz
.PHONY: soak-fuzz
soak-fuzz: venv
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/python -m pip install --quiet atheris
	mkdir -p $(FUZZ_DIR)/corpus
	$(BIN)/python fuzz/fuzz_multipart.py $(FUZZ_DIR)/corpus fuzz/corpus -dict=fuzz/multipart.dict \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=$(FUZZ_DIR)/
	# The audio duration probes: the same invariants (no raise, bounded state, at_least never
	# more than end(), the same answer whatever the chunking), FUZZ_AUDIO_SECONDS each.
	mkdir -p $(FUZZ_DIR)/riff-mpeg $(FUZZ_DIR)/flacogg $(FUZZ_DIR)/containers
	$(BIN)/python fuzz/fuzz_audio_riff_mpeg.py $(FUZZ_DIR)/riff-mpeg fuzz/corpus-audio-riff-mpeg \
	  -max_total_time=$(FUZZ_AUDIO_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
	  -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/riff-mpeg-
	$(BIN)/python fuzz/fuzz_audio_flacogg.py $(FUZZ_DIR)/flacogg fuzz/corpus-flacogg \
	  -max_total_time=$(FUZZ_AUDIO_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=$(FUZZ_DIR)/flacogg-
	$(BIN)/python fuzz/fuzz_audio_containers.py $(FUZZ_DIR)/containers \
	  -max_total_time=$(FUZZ_AUDIO_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=$(FUZZ_DIR)/containers-

# Load and leak checks, not part of `make test` (soak/, ~1 min): 1,000 concurrent speech streams
# and 200 concurrent 25 MiB uploads through one gateway process, then fds, spool files and in-flight
# requests back to where they were. Prints the figures. Runs soak-fuzz too when there is one.
.PHONY: soak
soak: venv
	$(BIN)/python -m pytest soak -q -s
	@if $(MAKE) -n soak-fuzz >/dev/null 2>&1; then $(MAKE) --no-print-directory soak-fuzz; fi
