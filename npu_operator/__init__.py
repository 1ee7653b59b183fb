"""NPU operator: one NPUClusterPolicy (``npuclusterpolicies.npu.openfuyao.com``) installs, validates and reports
every NPU component (issue 21; docs/npu-operator.md). Built so far: the API types, the status logic, node feature
discovery and the driver check, all pure; the controller comes next."""
