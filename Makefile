# catdog-serve: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS_DIR ?= models
# The development dataset's roots, when they are beside the checkout (train, verify and evaluate
# take any number). `make models` never needs them: it rebuilds from the committed weights, and
# the figures come from the evaluation recorded by `make train` for exactly those weights.
DATA ?= $(wildcard ../shared/data/catdog-web ../shared/data/catdog-more)
DATA_ARG := $(if $(DATA),--data $(DATA))
HOST ?= 0.0.0.0
PORT ?= 8000

CHECKOV_VENV ?= .venv-checkov
KSERVE_VENV ?= .venv-kserve
OPENVINO_VENV ?= .venv-openvino

.PHONY: install models verify report serve serve-openvino test unit lint typecheck checkov image smoke-test pod-smoke-test bench bench-contention bench-contention-bf16 bench-gpu bench-features soak overload overload-openvino hostile-memory hostile-memory-openvino train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,dev]'
	touch $@

models: $(MODELS_DIR)/manifest.json

$(MODELS_DIR)/manifest.json: $(VENV)/.installed $(wildcard model_export/weights/*) $(wildcard model_export/*.py)
	$(PY) -m model_export build --out $(MODELS_DIR)

verify: models
	$(PY) -m model_export verify --out $(MODELS_DIR) $(DATA_ARG)

# The tables, the plot and the int8 speed-ups on onnxruntime's CPU provider, then the same
# speed-ups on OpenVINO (README, "OpenVINO"), in one run.
report: models $(OPENVINO_VENV)/.installed
	$(PY) -m model_export report --out $(MODELS_DIR) --plot docs/frontier.png
	$(OPENVINO_VENV)/bin/python -m model_export report --out $(MODELS_DIR) --speedups-only --provider openvino

serve: models
	CATDOG_MODELS_DIR=$(MODELS_DIR) $(VENV)/bin/catdog-serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Strict on service/ and catdog_core/ (pyproject.toml [tool.mypy]).
typecheck: $(VENV)/.installed
	$(PY) -m mypy

# The inner loop: tests that need no built models, no network and no checkov (under a minute).
unit: $(VENV)/.installed
	$(PY) -m pytest -q -m "not models and not slow"

$(CHECKOV_VENV)/.installed: deploy/checkov-requirements.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet -r deploy/checkov-requirements.txt
	touch $@

# Security policy checks on the rendered manifests and the Dockerfile (offline: --skip-download).
checkov: $(CHECKOV_VENV)/.installed $(VENV)/.installed
	mkdir -p build/k8s
	for overlay in cpu gpu openvino; do $(VENV)/bin/kubectl kustomize k8s/overlays/$$overlay > build/k8s/$$overlay.yaml; done
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes \
		-f build/k8s/cpu.yaml -f build/k8s/gpu.yaml -f build/k8s/openvino.yaml
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework dockerfile -f Dockerfile

# KServe's SDK, the other real Open Inference Protocol client the tests drive (tests/clients).
$(KSERVE_VENV)/.installed: tests/clients/kserve-requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet -r tests/clients/kserve-requirements.txt
	touch $@

# The service on onnxruntime's OpenVINO provider: onnxruntime-openvino installs the same
# `onnxruntime` module as onnxruntime, so it replaces it in a venv of its own (README, "OpenVINO");
# make test, make report and make serve-openvino use it (tqdm, httpx, matplotlib and pyyaml:
# evaluate --provider openvino, bench.contention and bench.hostile_memory run from it too).
$(OPENVINO_VENV)/.installed: pyproject.toml deploy/openvino-requirements.txt
	$(PYTHON) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/pip install --quiet --upgrade pip
	$(OPENVINO_VENV)/bin/pip install --quiet -e . 'tqdm>=4.66,<5' 'httpx>=0.27,<1' 'matplotlib>=3.9,<4' 'pyyaml>=6,<7'
	# Both out, then the OpenVINO wheel in: on a re-run the line above has put onnxruntime's files
	# over onnxruntime-openvino's, and removing one of the two removes files the other needs.
	$(OPENVINO_VENV)/bin/pip uninstall --quiet --yes onnxruntime onnxruntime-openvino
	$(OPENVINO_VENV)/bin/pip install --quiet -r deploy/openvino-requirements.txt
	touch $@

serve-openvino: models $(OPENVINO_VENV)/.installed
	CATDOG_MODELS_DIR=$(MODELS_DIR) CATDOG_PROVIDERS=openvino $(OPENVINO_VENV)/bin/catdog-serve --host $(HOST) --port $(PORT)

test: models lint typecheck checkov $(KSERVE_VENV)/.installed $(OPENVINO_VENV)/.installed
	$(PY) -m pytest

# Container image with buildah/podman (no Docker engine needed); see deploy/*.sh. Release checks,
# not part of `make test`: they take minutes and need root for debootstrap.
image: $(VENV)/.installed
	PY=$(PY) deploy/build-image.sh

smoke-test:
	deploy/smoke-test.sh

# The image from `make image` under the Deployment's own limits (podman kube play of the cpu
# overlay): worst-case uploads and a 3x burst must not get it OOM-killed or restarted.
pod-smoke-test: $(VENV)/.installed
	$(PY) -m bench.pod_smoke $(ARGS)

bench: models
	$(PY) -m bench --models-dir $(MODELS_DIR)

# The project, a plain FastAPI handler and LitServe under contention: quiet, one core taken, CPU
# quotas of 1.5 and 1 (cgroups: needs root). Table and docs/contention.png. Options through
# ARGS, e.g. ARGS="--paired --rounds 5 --models mobilenet".
bench-contention: models
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.contention --models-dir $(MODELS_DIR) $(ARGS)

# The same sitting on onnxruntime's OpenVINO provider with the fp32 models computed in bf16 (CPUs
# with AMX or AVX-512 BF16; README, "OpenVINO"): catdog-serve with CATDOG_OPENVINO_PRECISION=bf16
# against the plain handler on the same ONNX files, both from .venv-openvino.
bench-contention-bf16: models $(OPENVINO_VENV)/.installed
	$(OPENVINO_VENV)/bin/python -m bench.contention --models-dir $(MODELS_DIR) --paired \
		--servers "plain FastAPI" --variant "catdog-serve bf16:CATDOG_OPENVINO_PRECISION=bf16" \
		--out bench/results/contention-bf16.json --plot bench/results/contention-bf16.png $(ARGS)

# Each model on the CUDA provider against this machine's CPU: latency, runs at a new batch size,
# agreement on photos. Needs onnxruntime-gpu in place of onnxruntime and a GPU (README, "GPU").
bench-gpu: models
	$(PY) -m bench.gpu --models-dir $(MODELS_DIR) $(if $(DATA),--photos $(firstword $(DATA)))

# The response cache (hit rate 0/50/90 %) and the shadow watch at 10 %, against both off.
bench-features: models
	$(PY) -m bench.features --models-dir $(MODELS_DIR)

# Open-loop overload (Locust in its own process) at 1x/2x/3x the capacity measured in the same run.
overload: models
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.overload --models-dir $(MODELS_DIR)

# The same with the server on onnxruntime's OpenVINO provider (.venv-openvino; Locust stays in
# .venv); CATDOG_OPENVINO_PRECISION=bf16 in the environment reaches the server.
overload-openvino: models $(OPENVINO_VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.overload --models-dir $(MODELS_DIR) --server-python $(OPENVINO_VENV)/bin/python \
		--out bench/results/overload-openvino.json --plot bench/results/overload-openvino.png $(ARGS)

# Peak memory under the worst uploads the limits admit, against the Deployment's memory limit.
hostile-memory: models
	$(PY) -m bench.hostile_memory --models-dir $(MODELS_DIR)

# The same on onnxruntime's OpenVINO provider, against the openvino overlay's ConfigMap and limit.
hostile-memory-openvino: models $(OPENVINO_VENV)/.installed
	$(OPENVINO_VENV)/bin/python -m bench.hostile_memory --models-dir $(MODELS_DIR) --overlay openvino \
		--out bench/results/hostile_memory_openvino.json

# Memory under 10 minutes of mixed load (RSS plot in bench/results/soak_rss.png).
soak: models
	$(PY) -m bench.soak --models-dir $(MODELS_DIR)

# Developers only: retrain on the dataset, then fit temperatures, recompute int8 ranges and record the
# evaluation. Xception first: the MobileNets distil from the int8 Xception built from its new weights
# (only Xception is built for that, beside the models, so a failed run leaves no partial manifest).
TEACHER_DIR ?= build/teacher
train: $(VENV)/.installed
	$(if $(DATA),,$(error no dataset: set DATA to one or more ImageFolder roots))
	$(PY) -m model_export train --data $(DATA) --only xception
	$(PY) -m model_export build --out $(TEACHER_DIR) --data $(DATA) --fit-temperatures --int8-ranges --only xception
	$(PY) -m model_export train --data $(DATA) --only mobilenet mobilenet-160 --teacher $(TEACHER_DIR)/xception-int8.onnx
	$(PY) -m model_export build --out $(MODELS_DIR) --data $(DATA) --fit-temperatures --int8-ranges

clean:
	rm -rf $(MODELS_DIR) build .pytest_cache .ruff_cache
