# Two commands for a fresh machine: `make demo` and `make test`.
# Both build .venv in the repo root from pyproject.toml (only when it changed).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo scan clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# checkov lives in its own venv: it pins boto3 and packaging below what kfp and kserve need.
CHECKOV := $(VENV)/tools/checkov/bin/checkov
$(CHECKOV): manifests/checkov-requirements.txt
	PYTHON=$(PYTHON) bash manifests/install-checkov.sh

test: venv $(CHECKOV)
	$(BIN)/python -m pytest tests

# Security scan of the rendered manifests (also part of make test).
scan: venv $(CHECKOV)
	$(BIN)/python -m bincounter.k8s.scan --checkov $(CHECKOV) manifests

demo: venv
	$(BIN)/python -m bincounter.demo

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# ---- container images (docs/images.md) ------------------------------------------------------
# Every name comes from bincounter/images.py (stdlib only, so no venv is needed to ask it).
# REGISTRY and TAG default to its values ($BINCOUNTER_REGISTRY / $BINCOUNTER_TAG, else the defaults).
# `make images push TAG=x` builds and pushes all three; then compile the pipeline and render the
# manifests with BINCOUNTER_TAG=x so they reference the same tag (docs/images.md).
DOCKER ?= docker
PLATFORM ?= linux/amd64
images_py = $(PYTHON) -m bincounter.images
# Asked once per make run (:=), and only when not given on the command line or in the environment.
ifeq ($(origin REGISTRY),undefined)
REGISTRY := $(shell $(PYTHON) -c 'from bincounter import images; print(images.registry())')
endif
ifeq ($(origin TAG),undefined)
TAG := $(shell $(PYTHON) -c 'from bincounter import images; print(images.tag())')
endif
# One call: `role=reference=Dockerfile` words, looked up per role below.
IMAGE_LIST := $(shell $(images_py) list --format make --registry '$(REGISTRY)' --tag '$(TAG)' 2>/dev/null)
IMAGE_ROLES := $(foreach i,$(IMAGE_LIST),$(firstword $(subst =, ,$(i))))
image_ref = $(word 2,$(subst =, ,$(filter $(1)=%,$(IMAGE_LIST))))
image_dockerfile = $(word 3,$(subst =, ,$(filter $(1)=%,$(IMAGE_LIST))))

.PHONY: images push image-names

# Fails loudly on a bad REGISTRY or TAG (the $(shell) calls below cannot).
image-names:
	@$(images_py) list --registry '$(REGISTRY)' --tag '$(TAG)'

images: image-names $(addprefix image-,$(IMAGE_ROLES))

image-%: image-names
	$(DOCKER) build --platform $(PLATFORM) --file $(call image_dockerfile,$*) --tag $(call image_ref,$*) .

push: images $(addprefix push-,$(IMAGE_ROLES))

push-%: image-%
	$(DOCKER) push $(call image_ref,$*)
