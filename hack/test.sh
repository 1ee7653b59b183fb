#!/usr/bin/env bash
# Run fuyao's checks: creates .venv, installs .[test], builds (once, cached under ~/.cache/fuyao) the upstream
# binaries the integration and end-to-end tests run (etcd, kube-apiserver, kube-scheduler, kube-controller-manager,
# kubelet, kubectl, and for monitoring Prometheus, promtool, the Prometheus Operator, metrics-server, KEDA), installs
# the local cluster's Debian packages (containerd, runc, CNI plugins), builds the
# cached vLLM CPU venv the real-engine tests use (hack/build-vllm.sh) and the Ray venv (hack/build-ray.sh), runs
# ruff, mypy and pytest, then (a whole run, as root) the kind suite on fuyao's own dockerd (kind, kubeadm and crictl
# built too; docs/kind.md). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"
ensure_venv test
cd "$REPO_ROOT"
echo "==> upstream binaries (cached after the first build: hack/build-upstream.sh)"
# nothing else runs yet: a cold build may use both cores
BUILD_JOBS="${BUILD_JOBS:-2}" GOMAXPROCS="${GOMAXPROCS:-2}" bash hack/build-upstream.sh etcd kube-apiserver \
  kube-scheduler kube-controller-manager kubelet kubectl kube-proxy coredns kwok helm monitoring ray kind
source "$REPO_ROOT/hack/lib/cluster-deps.sh"
# not root: the checks still run; the local-cluster tests need root (and these packages) anyway and say so
ensure_cluster_deps || echo "==> going on without them: the local-cluster tests will fail or skip" >&2
echo "==> vLLM CPU venv for the real-engine tests (cached after the first build: hack/build-vllm.sh)"
bash hack/build-vllm.sh >/dev/null
echo "==> Ray venv for the Ray Serve tests (cached after the first build: hack/build-ray.sh)"
bash hack/build-ray.sh >/dev/null
echo "==> ruff check"
ruff check .
echo "==> mypy (the kernel and every component: pyproject.toml [tool.mypy])"
mypy
# A local cluster left up by hack/demo.sh or hack/local-up.sh holds the addresses the end-to-end tests' clusters use
# (the harness refuses to start beside it): stop it, saying so. (A dead one's network is swept by the harness.)
for state_dir in /tmp/fuyao-demo /tmp/fuyao-cluster; do
  if [ -f "$state_dir/state.json" ]; then
    echo "==> stopping the local cluster in $state_dir (left up by hack/demo.sh or hack/local-up.sh; the end-to-end" \
      "tests need its addresses)"
    python -m tests.support.cluster down --state-dir "$state_dir"
  fi
done
echo "==> pytest"
# The checkout's modules are compiled once and the bytecode reused: with PYTHONDONTWRITEBYTECODE set (some CI
# images set it) every daemon, CLI and fake npu-smi call the tests start compiles fuyao's modules again
unset PYTHONDONTWRITEBYTECODE
set +e
python -m pytest --durations=40 "$@"  # the slowest tests named: where the time of a slow run went
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi

# The kind suite (docs/kind.md): the chart end-to-end tests marked kind, once more on a kind cluster with fuyao's
# node image, on fuyao's own dockerd (hack/lib/docker.sh: never the system's Docker). Only on a whole run (no test
# selected by path or expression) and as root; stopped afterwards (its images stay cached).
whole_run=true
for arg in "$@"; do [[ $arg == -* ]] || whole_run=false; done
if $whole_run && [ "$(id -u)" = 0 ]; then
  source "$REPO_ROOT/hack/lib/docker.sh"
  echo "==> the kind suite (pytest --cluster=kind -m kind) on fuyao's own dockerd"
  trap stop_private_docker EXIT  # a dockerd that failed to come up, or a failure below, is not left running
  set +e
  if ensure_private_docker; then
    if [ -f /tmp/fuyao-kind/state.json ]; then
      echo "==> deleting the kind cluster left up by hack/kind-up.sh (the kind suite needs its addresses)"
      python -m tests.support.kind down --state-dir /tmp/fuyao-kind
    fi
    python -m pytest tests/e2e/test_charts_on_cluster.py --cluster=kind -m kind "$@"
    kind_rc=$?
  else
    echo "==> fuyao's own dockerd did not start: the kind suite fails" >&2
    kind_rc=1
  fi
  set -e
  stop_private_docker
  trap - EXIT
  [ "$rc" -eq 0 ] && rc=$kind_rc
elif ! $whole_run; then
  echo "==> the kind suite is skipped (tests were selected; run it with pytest --cluster=kind -m kind, docs/kind.md)"
else
  echo "==> the kind suite is skipped (not root: it runs fuyao's own dockerd)"
fi
exit "$rc"
