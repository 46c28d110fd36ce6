# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := dcmtk orthanc orthanc-dicomweb invesalius-examples chromium postgresql rsyslog rsyslog-gnutls
X3DOM := viewer/vendor/node_modules/x3dom/x3dom.js
X3DOM_VERSION := 1.8.3
# OHIF's prebuilt viewer (npm @ohif/app, its dist/), served at /ohif/; the SHA-512 is npm's "integrity"
OHIF_VERSION := 3.13.2
OHIF_SHA512 := sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
# the install mends two of its bugs (viewer/ohif.py's _rewrite): a new mend, or a change in what the install writes, gets
# a new number, so that `make install` installs again where the release is already installed
OHIF_MENDS := 3
OHIF := viewer/vendor/ohif/.installed-$(OHIF_VERSION)-$(OHIF_MENDS)
CONFIG ?=

.PHONY: install run test test-stock-path test-fast fuzz bench clean

$(BIN)/m3dicom: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(X3DOM):
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null; }
	npm install --silent --no-audit --no-fund --prefix viewer/vendor x3dom@$(X3DOM_VERSION)

$(OHIF): | $(BIN)/m3dicom $(X3DOM)
	rm -rf viewer/vendor/ohif-download && mkdir -p viewer/vendor/ohif-download
	cd viewer/vendor/ohif-download && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	$(BIN)/python -m viewer.ohif install --sha512 '$(OHIF_SHA512)' \
		viewer/vendor/ohif-download/ohif-app-$(OHIF_VERSION).tgz
	rm -rf viewer/vendor/ohif-download
	touch $@

install: $(BIN)/m3dicom $(X3DOM) $(OHIF)
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@# the packages' bytecode, made now: where PYTHONDONTWRITEBYTECODE is set (containers, CI) every process would
	@# compile them again at its start (0.3 s a node, a receiver, a CLI command); only changed files are compiled
	$(BIN)/python -m compileall -q -j0 -x /vendor/ node scp archive router gpu_workers viewer certs >/dev/null

certs/server.pem: | $(BIN)/m3dicom
	$(BIN)/m3dicom certs init --dir certs

run: install certs/server.pem
	$(BIN)/m3dicom serve $(if $(CONFIG),--config $(CONFIG))

# the whole suite, then the receive, query and retrieve tests again on pynetdicom's generic path
test: install
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-stock-path PYTEST_ARGS=   # the main run's selection is not this one's

# dicom.fast_path = false on every node the tests start: the stock path stays correct
STOCK_PATH_TESTS = tests/test_interop_dcmtk.py tests/test_query.py tests/test_retrieve.py
test-stock-path: install
	M3DICOM_TEST_STOCK_PATH=1 $(BIN)/python -m pytest -q $(STOCK_PATH_TESTS) $(PYTEST_ARGS)

# the quick loop: no browser, no slow tests (about a third of the time)
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser" -x -q $(PYTEST_ARGS)

# long fuzzing runs of the PDU reader, command sets, data sets, C-FIND identifiers and viewer input
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -m fuzz -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/query.py
	$(BIN)/python bench/offload.py
	$(BIN)/python bench/router.py
	$(BIN)/python bench/mammo_froc.py
	$(BIN)/python bench/bone_mesh.py
	$(BIN)/python bench/gpu.py --backend numpy
	$(BIN)/python bench/viewer.py
	$(BIN)/python bench/dicomweb.py

clean:
	rm -rf $(VENV) *.egg-info
