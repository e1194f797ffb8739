# The README's two commands: `make demo` and `make test`. Both create .venv when missing and
# install kdctl into it (editable, with test extras); only Python 3.11 and make are needed.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdctl-installed
DATA   := ../shared/data

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	rm -rf demo-out
	$(BIN)/kdctl data stats demo --split val
	$(BIN)/kdctl train demo --model teacher --set train.epochs=16 --out demo-out/teacher
	$(BIN)/kdctl distill demo --method none --out demo-out/student
	$(BIN)/kdctl distill demo-crosskd --out demo-out/crosskd
	$(BIN)/kdctl distill demo-ssim --out demo-out/ssim
	$(BIN)/kdctl eval demo-out/crosskd/best.safetensors --save-predictions demo-out/crosskd_val.json
	$(BIN)/kdctl export demo-out/crosskd/best.safetensors --format onnx --out demo-out/crosskd.onnx --teacher demo-out/teacher/best.safetensors
	$(BIN)/kdctl eval demo-out/crosskd.onnx
	$(BIN)/kdctl export demo-out/crosskd/best.safetensors --format onnx --end-to-end --out demo-out/crosskd-e2e.onnx --runs 0
	$(BIN)/kdctl compare demo-out/teacher demo-out/student demo-out/crosskd demo-out/ssim --plot demo-out/curves.png
	@sed -n 's/^demo-peer: /the peer, from BENCHMARKS.md (not run here): /p' BENCHMARKS.md
	$(BIN)/kdctl predict demo-out/crosskd-e2e.onnx --data demo --split val --limit 8 --out demo-out/predict
	@echo "pictures: demo-out/predict/drawn/ (8 validation images, boxes by the end-to-end ONNX CrossKD student); curves: demo-out/curves.png"
	@if [ -d $(DATA)/coco-eval-fixtures ]; then \
	  $(BIN)/kdctl eval --data $(DATA)/coco-eval-fixtures/instances_val2014_100.json \
	    --predictions $(DATA)/coco-eval-fixtures/instances_val2014_fakebbox100_results.json; \
	else echo "($(DATA)/coco-eval-fixtures not found: skipping the predictions-file evaluation)"; fi

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_ssim.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
