#!/usr/bin/env bash
# Runs as root while the container image is built (bentofile.yaml docker.setup_script), after
# the Python packages are installed.
#
# The service runs as BentoML's user (bentoml, uid 1034) and downloads the weights into HF_HOME
# (/models/hf). Create it owned by that user, so that a container without a volume can still
# download, and a Docker named volume mounted at /models starts with that owner (Docker copies
# the image's directory into a new named volume). A host directory mounted there keeps its own
# owner: see README, Deploy and scale.
set -euo pipefail
owner="${BENTO_USER:-bentoml}"
install -d -o "$owner" -g "$owner" "$(dirname "${HF_HOME:?HF_HOME is set by bentofile.yaml envs}")" "$HF_HOME"
