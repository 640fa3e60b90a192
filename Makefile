# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment in .venv when it is absent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; unpinned, pip picks a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_DIR ?= demo_output
# test processes (pytest-xdist); a test file stays in one process, so its fixtures are made once
TEST_WORKERS ?= 2

# MONAI Label cannot share .venv (monailabel 0.8.5 pins numpy<2 through pydicom-seg and pulls sam2 and a
# CUDA torch): it gets its own environment with only what its server needs, and talks to us over HTTP.
# torchvision (a hard import of monailabel) exists on this disk only beside torch 2.14.1.
MLVENV ?= .venv-monailabel
MLBIN  := $(MLVENV)/bin
ML_TORCH ?= torch==2.14.1 torchvision==0.29.1
ML_DEPS := monai==1.6.1 pytorch-ignite numpy scipy pillow nibabel itk fire tqdm uvicorn pydantic \
	pydantic-settings python-dotenv fastapi python-multipart httpx schedule timeloop expiringdict expiring_dict \
	cachetools watchdog pynrrd einops pyyaml filelock passlib pyjwt bcrypt requests requests-toolbelt shapely \
	scikit-image scikit-learn SimpleITK psutil girder-client jsonschema "pydicom<3" "pynetdicom<2.1" \
	"dicomweb-client[gcp]<0.60"

.PHONY: venv demo test lint clean monailabel-env browser

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m gazemonai.demo --out $(DEMO_DIR)

test: venv monailabel-env browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(MLBIN)/.installed: pyproject.toml Makefile
	test -x $(MLBIN)/python || $(PYTHON) -m venv $(MLVENV)
	$(MLBIN)/python -m pip install --upgrade --quiet pip
	$(MLBIN)/python -m pip install --quiet $(ML_TORCH) $(ML_DEPS)
	$(MLBIN)/python -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1 -e .
	$(MLBIN)/python -c "import monailabel.main, monailabel.app, monailabel.tasks.infer.bundle, gazemonai.serve.staging"
	touch $@

monailabel-env: $(MLBIN)/.installed

# The annotation page's browser test drives Debian's chromium through Playwright (Playwright's own
# browser download cannot be reached from CI). Installed with apt when absent and run as root;
# elsewhere the test is skipped and says why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "warning: chromium could not be installed: the browser test will be skipped"; \
	else echo "note: chromium is absent (install it as root: make browser): the browser test will be skipped"; fi; }

clean:
	rm -rf $(VENV) $(MLVENV) $(DEMO_DIR)
