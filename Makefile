# Entry points for users and CI. Every target depends on `setup`, so `make demo` and `make test`
# are all a newcomer needs. Library code lives in pipeline/, shard_tools/ and tstl/; this file
# only wires variables to their command-line interfaces.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

DATA_DIR ?= data
RUNS_DIR ?= runs
JOBS ?= $(shell nproc)
# A registered dataset (tstl/core/datasets/): ssv2, ucf101, kinetics400, ek100.
DATASET ?= ucf101
# The datasets with a training config (configs/data/<name>.yaml = the registry's); an unknown DATASET stops at once.
DATASETS := $(sort $(basename $(notdir $(wildcard configs/data/*.yaml))))
check_dataset = $(if $(filter $(DATASET),$(DATASETS)),,$(error DATASET=$(DATASET) is not a registered dataset; \
  use one of: $(DATASETS) (tstl prepare-<dataset> --help; docs/pipeline.md "Adding a dataset")))
# checked when make reads this file, before `setup` or anything else runs
ifneq ($(filter finalize shards train eval print-config train-tstl eval-tstl,$(MAKECMDGOALS)),)
$(check_dataset)
endif
TSTL_CLI := $(PY) -m tstl.cli
SPLIT ?= 1
PART ?= 1/1
PREPARE_ARGS ?=
MODEL ?=
CLIP ?=
VIDEOMAE ?=
CHECKPOINT ?=
GROUPS ?=
INPUT ?=
OUT ?=
# e.g. PREDICT_ARGS="--window 4 --stride 2 --top-k 3"
PREDICT_ARGS ?=
OVERRIDES ?=
# Raw release folders, one variable per dataset (its `root_var` in tstl/core/datasets/<name>.py). Every *_ROOT
# variable (these, or any given on the command line or in the environment) is exported; `prepare-<dataset>` reads
# its own, and a dataset whose variable is unset reads $(DATA_DIR)/raw/<dataset>.
SSV2_ROOT ?= $(DATA_DIR)/raw/ssv2
UCF101_ROOT ?= $(DATA_DIR)/raw/ucf101
K400_ROOT ?= $(DATA_DIR)/raw/kinetics400
EK100_ROOT ?= $(DATA_DIR)/raw/ek100
# EPIC-KITCHENS-100's annotation repository, when it is not cloned inside EK100_ROOT
EK100_ANNOTATIONS ?=
export $(filter %_ROOT,$(.VARIABLES))
ifneq ($(EK100_ANNOTATIONS),)
export EK100_ANNOTATIONS
endif
SYNTH_ARGS ?=
MAX_FAIL ?= 0.05
BENCH_VIDEOS ?= 64
# Training: processes = local GPUs, or 1 CPU process where there is none (override with NPROC=n).
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n || echo 1)
MASTER_PORT ?= 29500
RUN_DIR ?= $(RUNS_DIR)/$(DATASET)-$(or $(MODEL),bcast_vit_b16)
# A recipe = data layer, model layer, and the (model, dataset) pair layer where one exists (docs/training.md, Recipes).
TRAIN_CONFIGS = configs/data/$(DATASET).yaml configs/model/$(or $(MODEL),bcast_vit_b16).yaml \
  $(wildcard configs/recipe/$(or $(MODEL),bcast_vit_b16)-$(DATASET).yaml)
comma := ,
INIT = $(strip $(CLIP) $(VIDEOMAE))
TRAIN_OVERRIDES = data_dir=$(DATA_DIR) out_dir=$(RUN_DIR) $(if $(INIT),model.init=[$(subst $(eval) ,$(comma),$(INIT))]) $(OVERRIDES)
# TSTL: both stages start from CAST (a trained B-CAST checkpoint or run folder) when given; GROUPS is a group file.
CAST ?=
BASELINE ?=
TSTL_DIR ?= $(RUNS_DIR)/tstl-$(DATASET)
TSTL_CONFIGS = $(TRAIN_CONFIGS) configs/tstl/default.yaml
TSTL_OVERRIDES = data_dir=$(DATA_DIR) out_dir=$(TSTL_DIR) $(if $(INIT),model.init=[$(subst $(eval) ,$(comma),$(INIT))]) \
  $(if $(CAST),tstl.init=[$(CAST)]) $(if $(GROUPS),tstl.groups=$(GROUPS)) $(if $(BASELINE),tstl.baseline=$(BASELINE)) $(OVERRIDES)
DEMO_TSTL = --config configs/data/ssv2.yaml configs/demo.yaml configs/tstl/demo.yaml data_dir=$(DATA_DIR) \
  out_dir=$(RUNS_DIR)/demo-tstl tstl.groups=$(RUNS_DIR)/demo-tstl-groups.json tstl.init=[$(RUNS_DIR)/demo] \
  tstl.baseline=$(RUNS_DIR)/demo $(OVERRIDES)

export PYTHONUNBUFFERED := 1

.PHONY: help setup lint test demo demo-tstl synthetic finalize shards train eval groups \
  train-tstl eval-tstl predict export bench clean-demo print-config

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: $(STAMP)  ## virtualenv in .venv with every dependency, ffmpeg and a C++ compiler for DeepSpeed

$(STAMP): pyproject.toml
	@if ! command -v ffmpeg >/dev/null || ! command -v g++ >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "setup: installing ffmpeg and g++ with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg g++ >/dev/null; \
	  else \
	    echo "setup: no system ffmpeg/g++ and no root: the imageio-ffmpeg binary is used for ffmpeg;" \
	         "install g++ yourself if you train with DeepSpeed on CPU"; \
	  fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[train]'
	$(PY) -c "import tstl.core.env; tstl.core.env.check()"
	touch $(STAMP)

lint: setup  ## ruff over the whole tree (rules in pyproject.toml [tool.ruff.lint]); CI runs it before the tests
	$(VENV)/bin/ruff check .

test: setup  ## run the test suite
	$(PY) -m pytest -q tests

synthetic: setup  ## synthetic raw datasets under DATA_DIR/raw (SYNTH_ARGS="--datasets ssv2,ek100")
	$(TSTL_CLI) synthetic --out $(DATA_DIR)/raw $(SYNTH_ARGS)

# One rule for every registered dataset (tstl --help lists them): its raw folder comes from its
# *_ROOT variable (SSV2_ROOT, UCF101_ROOT, K400_ROOT, EK100_ROOT). SSV2/UCF101 -> 240p, Kinetics-400
# -> short side 320, EK100 -> one clip per narration, short side 256 (change with e.g.
# PREPARE_ARGS="--short-side 256").
prepare-%: setup  ## prepare-<dataset>: raw release -> H.264 .mp4 + annotation CSVs + manifest
	$(TSTL_CLI) prepare-$* --data-dir $(DATA_DIR) --jobs $(JOBS) --part $(PART) --max-failure-fraction $(MAX_FAIL) $(PREPARE_ARGS)

finalize:  ## after --part runs on several machines: merge manifests, write CSVs (DATASET=...)
	$(TSTL_CLI) finalize $(DATA_DIR)/$(DATASET)

shards: setup  ## WebDataset shards of a prepared dataset (DATASET=..., SPLIT=1..3 for ucf101)
	$(TSTL_CLI) shards build --dataset $(DATASET) --data-dir $(DATA_DIR) --split $(SPLIT)

train: setup  ## DeepSpeed training on the shards of `make shards` (DATASET, MODEL, CLIP, VIDEOMAE, OVERRIDES)
	@# preflight: config, model and shard sets are checked (exit 2 naming the fix) before the launcher starts
	$(TSTL_CLI) train --check --config $(TRAIN_CONFIGS) $(TRAIN_OVERRIDES)
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $(MASTER_PORT) --module tstl.train.cli train \
	  --config $(TRAIN_CONFIGS) $(TRAIN_OVERRIDES)

print-config:  ## the resolved recipe of `make train` (DATASET, MODEL, CLIP, VIDEOMAE, OVERRIDES) as its config.yaml
	@$(MAKE) --no-print-directory setup >&2
	@$(TSTL_CLI) print-config --dataset $(DATASET) --model $(or $(MODEL),bcast_vit_b16) $(TRAIN_OVERRIDES)

eval: setup  ## multi-view evaluation of CHECKPOINT (a file, a DeepSpeed tag folder or a run folder)
	$(if $(CHECKPOINT),,$(error make eval needs CHECKPOINT=<checkpoint file, DeepSpeed tag folder or run folder>))
	$(TSTL_CLI) eval --checkpoint $(CHECKPOINT) $(if $(wildcard $(CHECKPOINT)/config.yaml $(CHECKPOINT)/../../config.yaml),,--config $(TRAIN_CONFIGS)) \
	  data_dir=$(DATA_DIR) $(OVERRIDES)

predict: setup  ## top-k classes of INPUT (files, folders, lists, shard sets) with CHECKPOINT (OUT=)
	$(if $(CHECKPOINT),,$(error make predict needs CHECKPOINT=<run folder, checkpoint or TSTL run>))
	$(if $(INPUT),,$(error make predict needs INPUT=<video files, folders, .txt lists, shard sets>))
	$(TSTL_CLI) predict --checkpoint $(CHECKPOINT) $(INPUT) $(if $(OUT),--out $(OUT)) $(PREDICT_ARGS)

export: setup  ## ONNX file of CHECKPOINT's classifier + JSON sidecar (OUT=exported/model.onnx)
	$(if $(CHECKPOINT),,$(error make export needs CHECKPOINT=<run folder or checkpoint>))
	$(if $(OUT),,$(error make export needs OUT=<file>.onnx (the sidecar <file>.json goes beside it)))
	$(TSTL_CLI) export --checkpoint $(CHECKPOINT) --out $(OUT)

groups: setup  ## TSTL class groups (K=groups; classes of DATASET's train shards or CLASSES=n; METHOD=confusion CONFUSION=x.npy; GROUPS=out)
	$(if $(K),,$(error make groups needs K=<number of groups>, e.g. make groups DATASET=ucf101 K=4 (classes from its \
	  training shard set), CLASSES=101 K=4, or METHOD=confusion CONFUSION=<run>/eval-x/confusion.npy K=15))
	$(TSTL_CLI) groups --method $(or $(METHOD),balanced) --num-groups $(K) \
	  $(if $(CLASSES),--num-classes $(CLASSES),$(if $(CONFUSION),,$(check_dataset)--dataset $(DATASET) --data-dir $(DATA_DIR) --split $(SPLIT))) \
	  $(if $(CONFUSION),--confusion $(CONFUSION)) --out $(or $(GROUPS),$(RUNS_DIR)/groups.json)

train-tstl: setup  ## TSTL: stage-1 selector + stage-2 experts, resumable (DATASET, GROUPS, CLIP, VIDEOMAE, CAST, OVERRIDES)
	$(TSTL_CLI) train-tstl --check --config $(TSTL_CONFIGS) $(TSTL_OVERRIDES)
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $(MASTER_PORT) --module tstl.twostage.cli train \
	  --config $(TSTL_CONFIGS) $(TSTL_OVERRIDES)

eval-tstl: setup  ## TSTL routed multi-view evaluation, hard + soft routing (BASELINE=a single B-CAST run to compare)
	$(TSTL_CLI) eval-tstl --config $(TSTL_CONFIGS) $(TSTL_OVERRIDES)
	@cat $(TSTL_DIR)/eval/report.md

demo: setup  ## the whole pipeline end to end on a small synthetic dataset
	$(MAKE) synthetic SYNTH_ARGS="--preset demo --datasets ssv2"
	$(MAKE) prepare-ssv2 SSV2_ROOT=$(DATA_DIR)/raw/ssv2 MAX_FAIL=0.2  # the synthetic set has broken files on purpose
	$(MAKE) shards DATASET=ssv2
	$(TSTL_CLI) shards verify $(DATA_DIR)/ssv2/shards/train $(DATA_DIR)/ssv2/shards/val
	$(TSTL_CLI) train --config configs/data/ssv2.yaml configs/demo.yaml data_dir=$(DATA_DIR) \
	  out_dir=$(RUNS_DIR)/demo $(OVERRIDES)
	@cat $(RUNS_DIR)/demo/report.md

demo-tstl: setup  ## TSTL on the demo data (runs `make demo` first if needed): groups, both stages, routed eval
	@test -f $(RUNS_DIR)/demo/report.md || $(MAKE) demo
	# groups from the demo B-CAST's confusion on the *training* videos (the val videos stay unseen)
	$(TSTL_CLI) eval --checkpoint $(RUNS_DIR)/demo --out $(RUNS_DIR)/demo/train-confusion \
	  data_dir=$(DATA_DIR) val_split=train data.test_views=[1,1]
	$(TSTL_CLI) groups --method confusion --num-groups 4 \
	  --confusion $(RUNS_DIR)/demo/train-confusion/confusion.npy --out $(RUNS_DIR)/demo-tstl-groups.json
	$(TSTL_CLI) train-tstl $(DEMO_TSTL)
	$(TSTL_CLI) eval-tstl $(DEMO_TSTL)
	@cat $(RUNS_DIR)/demo-tstl/eval/report.md

bench: setup  ## benchmarks; figures go to docs/benchmarks.md
	$(PY) -m benchmarks.transcode --out docs/benchmarks.md
	$(PY) -m benchmarks.loader --out docs/benchmarks.md --videos $(BENCH_VIDEOS)
	$(PY) -m benchmarks.loader_io --out docs/benchmarks.md
	$(PY) -m benchmarks.bcast --out docs/benchmarks.md
	$(PY) -m benchmarks.timesformer --out docs/benchmarks.md
	$(PY) -m benchmarks.tstl_routing --out docs/benchmarks.md
	$(PY) -m benchmarks.data_wait --out docs/benchmarks.md
	$(PY) -m benchmarks.predict --out docs/benchmarks.md --videos $(BENCH_VIDEOS)

clean-demo:  ## remove the demo data and run
	rm -rf $(DATA_DIR)/raw $(DATA_DIR)/ssv2 $(DATA_DIR)/ucf101 $(DATA_DIR)/kinetics400 $(RUNS_DIR)/demo $(RUNS_DIR)/demo-tstl $(RUNS_DIR)/demo-tstl-groups.json
