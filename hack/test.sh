#!/usr/bin/env bash
# Run fuyao's checks: creates .venv, installs .[test], builds (once, cached under ~/.cache/fuyao) the upstream
# binaries the integration and end-to-end tests run (etcd, kube-apiserver, kube-scheduler, kube-controller-manager,
# kubelet, kubectl, and for monitoring Prometheus, promtool, the Prometheus Operator, metrics-server, KEDA), installs
# the local cluster's Debian packages (containerd, runc, CNI plugins), builds the
# cached vLLM CPU venv the real-engine tests use (hack/build-vllm.sh) and the Ray venv (hack/build-ray.sh), runs
# ruff, mypy and pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"
ensure_venv test
cd "$REPO_ROOT"
echo "==> upstream binaries (cached after the first build: hack/build-upstream.sh)"
# nothing else runs yet: a cold build may use both cores
BUILD_JOBS="${BUILD_JOBS:-2}" GOMAXPROCS="${GOMAXPROCS:-2}" bash hack/build-upstream.sh etcd kube-apiserver \
  kube-scheduler kube-controller-manager kubelet kubectl kube-proxy coredns kwok helm monitoring ray
source "$REPO_ROOT/hack/lib/cluster-deps.sh"
ensure_cluster_deps
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
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
