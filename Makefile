# Everything sets itself up: a fresh clone with only the machine's base Python needs no other step.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
# System tools the tests drive for real: curl as in the README, file to name the audio,
# redis-server for the shared rate limits and usage stream.
SYSTEM_TOOLS := curl file redis-server

.PHONY: run test venv system-tools clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The gateway on 127.0.0.1:3000 with etc/aisix/, and the development upstream on 127.0.0.1:3001
# that the shipped aliases point at. Ctrl-C stops both.
run: venv
	@$(BIN)/python -m aisix.devupstream --listen 127.0.0.1:3001 & dev=$$!; \
	trap 'kill $$dev 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python -m aisix serve -c etc/aisix/config.yaml

test: venv system-tools
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
