# Cluster launch targets; included from the top-level Makefile (`include clusters/clusters.mk`).
# Each target prints the command it runs (submits); DRY=1 prints without running, so they work without a cluster:
#   make slurm-pretrain CONFIG=flash NODES=32 GPUS=8 TIME=24:00:00 DRY=1
# See clusters/README.md for every setting and a worked example.

CLUSTERS_DIR := clusters
VENV ?= .venv
PY ?= $(VENV)/bin/python
RAY_BIN ?= $(VENV)/bin/ray
RAY_CLUSTER ?= $(CLUSTERS_DIR)/ray/cluster.yaml

# CONFIG must be given explicitly for cluster jobs (a tiny default is right for `make pretrain`, not for 32 nodes).
# $(origin) tells a command-line/environment CONFIG from the Makefile's default.
_cl_config = $(if $(filter command environment override,$(firstword $(origin CONFIG))),$(CONFIG),)

# Settings handed to the scripts (those left empty fall back to the scripts' defaults).
_cl_env = NODES='$(NODES)' GPUS='$(GPUS)' DEVICE='$(DEVICE)' TIME='$(TIME)' SIGNAL_LEAD='$(SIGNAL_LEAD)' \
          PARTITION='$(PARTITION)' ACCOUNT='$(ACCOUNT)' QOS='$(QOS)' RUN_DIR='$(RUN_DIR)' CHAIN='$(CHAIN)' \
          REQUEUE='$(REQUEUE)' SBATCH_EXTRA='$(SBATCH_EXTRA)' DRY='$(DRY)' V4_RAY_AUTH='$(V4_RAY_AUTH)'

.PHONY: slurm-pretrain slurm-data ray-up ray-down ray-data dry-run

## slurm-pretrain CONFIG= NODES= GPUS= [TIME= CHAIN= RUN_DIR= ARGS="k=v ..." DRY=1]: sbatch the trainer
slurm-pretrain:
	@$(_cl_env) CONFIG='$(_cl_config)' $(CLUSTERS_DIR)/slurm/submit_pretrain.sh $(ARGS)

## slurm-data [NODES= OUTPUT= MIXTURE= CPUS= DRY=1]: sbatch the data pipeline on a Ray cluster inside the job
slurm-data:
	@$(_cl_env) CONFIG='$(CONFIG)' OUTPUT='$(OUTPUT)' MIXTURE='$(MIXTURE)' CPUS='$(CPUS)' LOG_DIR='$(LOG_DIR)' \
	    $(CLUSTERS_DIR)/slurm/submit_data.sh $(ARGS)

## ray-up / ray-down [RAY_CLUSTER=clusters/ray/cluster.yaml DRY=1]: start / stop a Ray cluster with `ray up`
## (token auth: a fresh token per cluster in runs/ray-auth/<cluster_name>/; V4_RAY_AUTH=disabled opts out)
ray-up:
	@DRY='$(DRY)' RAY_BIN='$(RAY_BIN)' V4_RAY_AUTH='$(V4_RAY_AUTH)' $(CLUSTERS_DIR)/ray/cluster.sh up '$(RAY_CLUSTER)'

ray-down:
	@DRY='$(DRY)' RAY_BIN='$(RAY_BIN)' V4_RAY_AUTH='$(V4_RAY_AUTH)' $(CLUSTERS_DIR)/ray/cluster.sh down '$(RAY_CLUSTER)'

## ray-data [RAY_ADDRESS=http://head:8265 OUTPUT= MIXTURE= NO_WAIT=1 DRY=1]: `ray job submit` the data pipeline
## (the token: RAY_AUTH_TOKEN_PATH, else the one `make ray-up` wrote for RAY_CLUSTER)
ray-data:
	@DRY='$(DRY)' RAY_BIN='$(RAY_BIN)' OUTPUT='$(OUTPUT)' MIXTURE='$(MIXTURE)' RAY_CLUSTER='$(RAY_CLUSTER)' \
	    V4_RAY_AUTH='$(V4_RAY_AUTH)' RAY_ADDRESS='$(RAY_ADDRESS)' NO_WAIT='$(NO_WAIT)' \
	    SUBMISSION_ID='$(SUBMISSION_ID)' $(CLUSTERS_DIR)/ray/submit_data.sh $(ARGS)

## dry-run CONFIG= NODES= [GPUS=]: the parallel layout and memory plan, without GPUs
dry-run:
	@$(_cl_env) CONFIG='$(_cl_config)' PY='$(PY)' $(CLUSTERS_DIR)/dry_run.sh $(ARGS)
