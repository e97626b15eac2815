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
# BUILDER=buildah builds without a daemon or registry (images/buildah.sh: a local Debian base);
# `make image-smoke` then runs each image's entrypoint inside it. Neither is part of `make test`.
BUILDER ?= docker
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

.PHONY: images push image-names image-smoke

# Fails loudly on a bad REGISTRY or TAG (the $(shell) calls below cannot).
image-names:
	@$(images_py) list --registry '$(REGISTRY)' --tag '$(TAG)'

images: image-names $(addprefix image-,$(IMAGE_ROLES))

ifeq ($(BUILDER),docker)
image-%: image-names
	$(DOCKER) build --platform $(PLATFORM) --file $(call image_dockerfile,$*) --tag $(call image_ref,$*) .
else ifeq ($(BUILDER),buildah)
image-%: image-names
	bash images/buildah.sh build $* $(call image_ref,$*) $(call image_dockerfile,$*)
else
image-%:
	@echo "BUILDER=$(BUILDER): expected docker (DOCKER=docker or podman) or buildah" >&2; exit 2
endif

push: images $(addprefix push-,$(IMAGE_ROLES))

push-%: image-%
ifeq ($(BUILDER),buildah)
	bash images/buildah.sh push $(call image_ref,$*)
else
	$(DOCKER) push $(call image_ref,$*)
endif

# The images `make images BUILDER=buildah` built, each running its real entrypoint (docs/images.md).
image-smoke: venv image-names
	$(BIN)/python images/smoke.py $(foreach r,$(IMAGE_ROLES),$(r)=$(call image_ref,$(r)))
