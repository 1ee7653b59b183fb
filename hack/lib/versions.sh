# Sourced by hack/*.sh: the pinned versions of hack/cluster/versions.env as shell variables (ETCD_VERSION,
# K8S_VERSION, VLLM_VERSION, RAY_VERSION, KUBERAY_VERSION...); an environment variable of the same name wins.
while IFS='=' read -r _name _value; do
  [[ $_name =~ ^[A-Z][A-Z0-9_]*$ ]] || continue
  [[ -n ${!_name+set} ]] || printf -v "$_name" '%s' "$_value"
done <"$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/cluster/versions.env"
