# The two commands of README.md, on a fresh Linux machine with Python 3.10+ and a C++ compiler:
#   make demo   - the main job: train and compare (creates .venv, installs torch + the package)
#   make test   - the test suite: every CPU test of the public API, in minutes on 2 cores (leaves
#                 out the tests marked slow in pyproject.toml)
# Other targets: test-all (every test, the slow ones too: CI runs it), docs (the documentation,
# warnings as errors, examples run as doctests), install, bench, cpp-test (CMake build + ctest),
# clean.
PY       ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') \
           setup.py pyproject.toml

.PHONY: demo test test-all install bench cpp-test clean

# What the build and the demo need, and no more: make demo installs only this.
$(VENV)/.deps:
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q torch numpy scipy scikit-learn tqdm ninja setuptools wheel
	# CUTLASS's C++ headers for the experimental sm_90 kernels (csrc/cuda/experimental/linear_sm90.h),
	# built only on request; its Python tools and their dependencies are not used.
	$(VPY) -m pip install -q --no-deps nvidia-cutlass
	touch $@

# What the tests add: pytest, the libraries some tests compare with or run (pandas,
# matplotlib, also for the benchmarks' plots), CMake for cpp-test, and the tools that wrap
# nn.Linear (tests/integration/test_tools.py: PEFT and Opacus).
$(VENV)/.test-deps: $(VENV)/.deps
	$(VPY) -m pip install -q pytest expecttest pandas matplotlib cmake pybind11 peft opacus
	touch $@

# The extension build, in place and incremental (objects under build/: a second build compiles
# only what changed); the checkout is put on the venv's path with a .pth file. CUDA kernels are
# built where a GPU is visible or when asked (setup.py's docstring: MANUAL_LAYERS_CUDA=1,
# TORCH_CUDA_ARCH_LIST); the build prints what it chose and why.
# The full log goes to $(VENV)/build.log; ninja's [k/n] progress lines and the build summary are
# shown as they come, so the minutes of compiling are not silent.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	@echo "building manual_layers._C: minutes on a small machine; progress below, full log in"
	@echo "$(VENV)/build.log"
	@{ $(VPY) setup.py -q build_ext --inplace ; echo $$? > $(VENV)/build.rc; } 2>&1 | \
		tee $(VENV)/build.log | grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] |manual_layers build' | \
		sed -u -E 's,^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]*/)?(csrc/[^ ]+\.(cpp|cu)) .*,  \1 compiling \3,' || true
	@test "$$(cat $(VENV)/build.rc)" = 0 || { tail -60 $(VENV)/build.log; exit 1; }
	echo "$(CURDIR)" > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/manual_layers_checkout.pth"
	cd /tmp && $(CURDIR)/$(VPY) -c "import manual_layers"
	touch $@

install: $(VENV)/.installed

# make demo: the build (above) streams its progress, then the showcase runs.
demo: install
	$(VPY) -m manual_layers demo

test: install $(VENV)/.test-deps
	$(VPY) -m manual_layers info
	$(VPY) -m pytest tests -q -m "not slow"

test-all: install $(VENV)/.test-deps
	$(VPY) -m manual_layers info
	$(VPY) -m pytest tests -q

bench: install $(VENV)/.test-deps
	$(VPY) benchmarks/bench_linear.py
	$(VPY) benchmarks/bench_logreg.py

# The same _C through CMake, plus the C++ smoke test under ctest (CPU kernels).
cpp-test: $(VENV)/.test-deps
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DPython_EXECUTABLE=$(abspath $(VPY)) -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && $(abspath $(VENV)/bin/ctest) --output-on-failure

clean:
	rm -rf build manual_layers/*.so *.egg-info $(VENV)/.installed docs/_build docs/api/generated

# make docs: the documentation (Sphinx, docs/) into docs/_build/html with warnings as errors, then
# Sphinx's doctest builder runs the examples of the pages and the docstrings. It installs
# docs/requirements.txt into the venv first.
.PHONY: docs
$(VENV)/.docs-deps: $(VENV)/.deps docs/requirements.txt
	$(VPY) -m pip install -q -r docs/requirements.txt
	touch $@

docs: install $(VENV)/.docs-deps
	$(VPY) -m sphinx -W --keep-going -b html docs docs/_build/html
	$(VPY) -m sphinx -W --keep-going -b doctest docs docs/_build/doctest
