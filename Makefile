# vlmjobs: `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-test.lock pyproject.toml | cksum | cut -d' ' -f1)
VLMJOBS := $(BIN)/vlmjobs
RECIPE ?= recipes/tiny-demo.yaml
# The cluster targets' recipe: RECIPE when given on the command line, else the project's cluster run.
CLUSTER_RECIPE ?= recipes/idefics2-8b-rlaif-v-dpo.yaml
K8S_RECIPE = $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),$(CLUSTER_RECIPE))
RUN_ARG = $(if $(RUN),--run=$(RUN))
# The simulated cluster's kubectl (a version its API server supports) while one is up, else PATH's.
KUBECTL ?= $(if $(wildcard .cache/cluster/bin/kubectl),.cache/cluster/bin/kubectl,kubectl)
SIMCLUSTER := $(PYTHON) scripts/cluster.py

.PHONY: install demo test mutate bench gpu-check lock clean render submit pipeline status logs delete k8s k8s-apply nightly goldens image push-image \
	cluster-build cluster-up cluster-down

install: $(STAMP)

# The exact versions in the lock files; the package itself is installed editable on top of them.
$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

# The main job on the embedded default: the local runner, a tiny model and synthetic data, on CPU.
demo: $(STAMP) .cache/tiny/llava/config.json .cache/data/chartqa/README.md .cache/data/rlaif-v/README.md
	$(VLMJOBS) run $(RECIPE)

# Rebuilt when the code that draws them changes, so a pulled change to the tiny models or data reaches the demo.
.cache/tiny/%/config.json: jobs/tiny.py | $(STAMP)
	$(VLMJOBS) tiny-model --family $* --out .cache/tiny/$*

.cache/data/%/README.md: jobs/synthetic.py | $(STAMP)
	$(VLMJOBS) synth-data --kind $* --out .cache/data/$*

# The cluster tests' binaries first (built once into ~/.cache/vlmjobs/cluster, minutes; then free), so that
# a build failure is a clear error here; without Go they are skipped, except under CI=true.
test: $(STAMP)
	$(SIMCLUSTER) build --unless-no-go
	$(BIN)/pytest $(PYTEST_ARGS)

# Mutation testing of the code whose numbers users act on (scripts/mutate.py: its scope, and a score per module).
# Not part of make test: 7 to 13 minutes on 2 cores, plus ~10 for each of jobs.inference and jobs.evaluate since their
# tiny-model tests joined. MUTANTS='jobs.metrics.x_amber*' runs only those; MUTANTS=jobs.inference one module.
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py $(MUTANTS)

# Speed and memory of the sft and dpo stages beside the source documents' plain scripts (not a test: no timing asserts),
# on the tiny models and on the real checkpoints' configs narrowed for a CPU (--geometry=real: charts of ChartQA's
# sizes and of one size for SFT), and the FLOPs per sample counted for the seed recipes' real checkpoints (FLOPS_ARGS,
# e.g. --rows=8). About an hour and a half on the 2-core machine, idle.
bench: $(STAMP)
	$(BIN)/python tests/bench/flops_table.py $(FLOPS_ARGS)
	$(BIN)/python tests/bench/sft_vs_plain.py $(BENCH_ARGS)
	$(BIN)/python tests/bench/sft_vs_plain.py --geometry=real $(BENCH_ARGS)
	$(BIN)/python tests/bench/sft_vs_plain.py --geometry=real --one-size $(BENCH_ARGS)
	$(BIN)/python tests/bench/dpo_vs_plain.py $(DPO_BENCH_ARGS)
	$(BIN)/python tests/bench/dpo_vs_plain.py --geometry=real $(DPO_BENCH_ARGS)

# The seed recipes at real size on one H100/H200 (scripts/gpu_check.py; README, "GPU check"). WHEELS: a folder holding
# the wheels it installs first, when the GPU machine lacks them. The machine's own python and torch (PYTHON), not the
# venv: install would fetch the lock's torch from the network
gpu-check:
	$(or $(PYTHON),python3) scripts/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# On a cluster: the current kube context (see README, "On a cluster"). render needs no cluster.
render: $(STAMP)  ## make render STAGE=dpo [RECIPE=... RUN=...]: print the stage's manifests, change nothing
	@$(VLMJOBS) render $(K8S_RECIPE) --stage=$(STAGE) $(RUN_ARG)

submit: $(STAMP)  ## make submit STAGE=dpo [DETACH=1]: create the stage's Job and follow it and its log
	$(VLMJOBS) submit $(K8S_RECIPE) --stage=$(STAGE) $(RUN_ARG) $(if $(DETACH),--detach)

pipeline: $(STAMP)  ## make pipeline [IN_CLUSTER=1] [DETACH=1]: the recipe's stages, one Job after another
	$(VLMJOBS) pipeline $(K8S_RECIPE) $(RUN_ARG) $(if $(IN_CLUSTER),--in-cluster) $(if $(DETACH),--detach)

status: $(STAMP)  ## make status [RUN=...]: the Jobs and their states
	$(VLMJOBS) status $(K8S_RECIPE) $(RUN_ARG)

logs: $(STAMP)  ## make logs STAGE=dpo [RUN=...]: a stage's log, followed
	$(VLMJOBS) logs $(K8S_RECIPE) --stage=$(STAGE) $(RUN_ARG)

delete: $(STAMP)  ## make delete RUN=... [STAGE=...]: delete a run's Jobs
	$(VLMJOBS) delete $(K8S_RECIPE) --run=$(RUN) $(if $(STAGE),--stage=$(STAGE))

# A real control plane on loopback with simulated nodes (kwok), for trying the cluster targets without a
# cluster; see README, "Try it without a cluster". cluster-up reuses a running one.
cluster-build:
	$(SIMCLUSTER) build

cluster-up:
	@$(SIMCLUSTER) up

cluster-down:
	$(SIMCLUSTER) down

# k8s/ is generated: namespace, PVC, the driver's RBAC, and the Secret and Kueue templates.
k8s: $(STAMP)
	$(VLMJOBS) k8s --out=k8s $(K8S_ARGS)

# Once per cluster, by someone allowed to create namespaces and Roles: the kustomize base k8s/ (namespace, volume,
# the driver's RBAC). No CronJob (make nightly), never the Secret template (a real Secret survives this).
k8s-apply:
	$(KUBECTL) apply -k k8s/

# The nightly schedule, its own step: make nightly RECIPE=recipes/x.yaml SCHEDULE='0 2 * * *'. Refused while the
# default image's tag names a commit the checkout has changes beyond; says which image the CronJob will pull.
nightly: $(STAMP)
	$(VLMJOBS) cronjob $(K8S_RECIPE) $(if $(SCHEDULE),"--kubernetes.nightly_schedule=$(SCHEDULE)") --out=k8s/nightly/cronjob.yaml
	$(KUBECTL) apply -k k8s/nightly

# Rewrite tests/golden/ from the renderer, then review the diff.
goldens: $(STAMP)
	VLMJOBS_UPDATE_GOLDENS=1 $(BIN)/pytest -q tests/launcher/test_golden.py

# The CUDA image (images/Dockerfile), tagged <registry>/vlmjobs:<version>-<git revision> by
# launcher.image.default_image(), the very function that names the image in the rendered Jobs.
# REGISTRY=... sets $VLMJOBS_REGISTRY for that call (render the Jobs with the same registry).
# launcher.image needs only the standard library, so plain python3 computes the tag, no .venv.
DOCKER ?= docker
IMAGE_INFO = $(if $(REGISTRY),VLMJOBS_REGISTRY=$(REGISTRY)) PYTHONPATH=. $(PYTHON) -c \
	'from jobs import __version__; from launcher import image; print(image.default_image(), __version__, image.revision(), image.REGISTRY)'
NO_DOCKER = echo "make $@: no Docker engine here ('$(DOCKER) info' failed); run it where a Docker daemon is running" >&2; exit 1

image:
	@$(DOCKER) info >/dev/null 2>&1 || { $(NO_DOCKER); }
	@info=$$($(IMAGE_INFO)) && set -- $$info && \
	if [ -n "$$(git status --porcelain)" ]; then echo "make image: warning: uncommitted changes go into $$1" >&2; fi && \
	echo "==> $$1" && \
	$(DOCKER) build --platform linux/amd64 --file images/Dockerfile --tag "$$1" \
		--build-arg VERSION="$$2" --build-arg REVISION="$$3" --build-arg REGISTRY="$$4" \
		--build-arg CREATED="$$(date -u +%Y-%m-%dT%H:%M:%SZ)" .

# A pushed tag names a revision; pushing uncommitted code under it would make Jobs run code no commit holds.
push-image:
	@$(DOCKER) info >/dev/null 2>&1 || { $(NO_DOCKER); }
	@if [ -n "$$(git status --porcelain)" ] && [ -z "$(ALLOW_DIRTY)" ]; then \
		echo "make push-image: uncommitted changes; commit them first (or ALLOW_DIRTY=1)" >&2; exit 1; fi
	@$(MAKE) --no-print-directory image
	@info=$$($(IMAGE_INFO)) && set -- $$info && $(DOCKER) push "$$1"

# Re-resolve requirements*.lock after changing dependencies in pyproject.toml.
lock:
	scripts/lock.sh

clean:
	rm -rf runs .cache mutants
