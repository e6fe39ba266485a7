# `make test`: fresh .venv, everything from requirements.txt, the whole suite.
# `make demo`: fresh .venv, train configs/synthetic.py on the built-in synthetic set, evaluate it,
# draw its training curves (WORKDIR/curves.png).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $(STAMP)

.PHONY: setup test demo
setup: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/python train.py --config configs/synthetic.py --workdir $(WORKDIR)
	$(VENV)/bin/python eval.py --config configs/synthetic.py --workdir $(WORKDIR) --num_visualize 4
	$(VENV)/bin/python -m m2f_jax.tools.plot_curves --workdir $(WORKDIR)
