# onnxrep: install, demo, test. PYTHON may name any interpreter (a venv's python, python3.11).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
ONNXREP ?= $(PYTHON) -m onnxrep.cli
EXAMPLE := models/examples/repvgg_tiny.onnx
LINTED := onnxrep tests models bench

.PHONY: install demo test-deps test lint fuzz bench targets clean

install:
	$(PIP) install -e .

# Fuse the bundled example (no torch needed) and print the report.
demo: install
	mkdir -p out
	$(ONNXREP) fuse $(EXAMPLE) out/repvgg_tiny.fused.onnx --report out/repvgg_tiny.report.json
	@echo "model: out/repvgg_tiny.fused.onnx  report: out/repvgg_tiny.report.json"

# torch is pinned to 2.13.0 in the test extra (see pyproject.toml).
test-deps:
	$(PIP) install -e '.[test]'

test: test-deps
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check $(LINTED)

# Property-based fuzzing (tests/test_fuzz.py): FUZZ_EXAMPLES draws of random multi-branch blocks
# (12,500 give over 10,000 distinct graphs; repeats count once), each
# fused and compared with the input; every mismatch is counted and saved under .fuzz/, the
# summary ("fuzz: N graphs, M mismatches") printed and written to .fuzz/summary.txt.
# FUZZ_SEED=<int> draws other graphs than the default (derandomized) ones.
FUZZ_EXAMPLES ?= 12500
# then random affine paths (tests/test_propagate_affine_fuzz.py): BN / constant maps through
# random layout ops and pools into random consumers, with fan-out
AFFINE_FUZZ_EXAMPLES ?= 5000
# and random reshape / transpose chains (tests/test_shape_names_fuzz.py): the dims onnxrep writes
# and the reshapes it removes, checked at batch 1, 2, 3 and 5
SHAPE_FUZZ_EXAMPLES ?= 5000
FUZZ_SEED ?=
fuzz:
	rm -rf .fuzz/mismatches .fuzz/summary.txt
	ONNXREP_FUZZ_MODE=campaign ONNXREP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) ONNXREP_FUZZ_SEED=$(FUZZ_SEED) \
		$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_fuzz.py -k campaign; \
		status=$$?; cat .fuzz/summary.txt 2>/dev/null; \
	ONNXREP_AFFINE_FUZZ_EXAMPLES=$(AFFINE_FUZZ_EXAMPLES) $(PYTHON) -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_propagate_affine_fuzz.py || status=1; \
	ONNXREP_SHAPE_FUZZ_EXAMPLES=$(SHAPE_FUZZ_EXAMPLES) $(PYTHON) -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_shape_names_fuzz.py || status=1; exit $$status

# Benchmarks: latency of every models/ family (train / fused / plain) and conversion cost
# against onnx load+save and onnxslim; writes bench/results.md and the README section.
bench:
	$(PIP) install -e '.[bench]'
	$(PYTHON) bench/run.py

# Deployment runtimes (issue 13): the optional extras, then every models/ family in every form
# fused and run on every installed runtime (tests marked `targets`, deselected by `make test`),
# then the table family x form x runtime into bench/targets.md and the README section.
# TARGETS_FAMILIES=a,b TARGETS_FORMS=... TARGETS_RUNTIMES=... restrict both.
targets:
	$(PIP) install -e '.[test,targets]'
	-$(PYTHON) bench/targets.py
	$(PYTHON) -m pytest -q -m targets tests/test_runtimes.py tests/test_targets.py

clean:
	rm -rf out build .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -not -path "./.git/*" -exec rm -rf {} +
