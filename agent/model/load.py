"""Loads Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy and Node objects from YAML/JSON.

This module is the public face of the loader; the work is cut by concern: agent.model.read
(texts, files and folders into documents), agent.model.parse (one object per kind),
agent.model.fields (typed field access and the input budget), agent.model.validation (the
syntax of single values) and agent.model.cluster_policy_load (ClusterNetworkPolicy and Node).

Input is what `kubectl get -o yaml|json` writes or what the API server returns: single objects,
multi-document YAML, `kind: List` and typed lists (`PodList`, ...). Validation follows the API
server (Kubernetes `pkg/apis/networking/validation`, `pkg/apis/core/validation` for the parts of a
Pod podfence reads, and apimachinery's label and selector validation), including its defaulting:
a missing port protocol is TCP, a NetworkPolicy without `policyTypes` gets `Ingress`, plus
`Egress` when it has egress rules, and a namespaced object without `metadata.namespace` is in
"default" (where `kubectl apply` without `-n` would put it).

Nothing here raises on bad input from `load_*`: each invalid object becomes one `ModelError`
(the first problem found, with the API-style field path), documents that cannot be parsed become
errors too, and every valid object is still returned. `parse_object` is the strict single-object
form used by sources that already hold a dict (it raises `PolicyError`).

Where this is stricter or looser than the API server, on purpose:
- a NetworkPolicy without `spec.podSelector` is rejected (the API server would decode it as `{}`,
  selecting every pod; in a hand-written file that is far more often a mistake than the intent);
- duplicate keys in YAML/JSON are rejected, as kubectl rejects them (PyYAML would keep the last);
- duplicate `policyTypes` entries are accepted, as the API server accepts them;
- IPv4 CIDRs with leading zeros (`010.0.0.0/8`) are read as decimal, as the API server's legacy
  CIDR parsing does, so a policy a cluster holds is never dropped here;
- fields podfence does not use are not validated, and a text holding only comments or
  whitespace is simply empty.
"""

from __future__ import annotations

from agent.model.fields import MAX_ITEMS_PER_OBJECT, MAX_ITEMS_PER_TEXT
from agent.model.parse import API_VERSIONS, CLUSTER_SCOPED, parse_object
from agent.model.parse_memo import ParseMemo
from agent.model.read import (
    MAX_FAST_NESTING,
    MAX_FILE_BYTES,
    MAX_LIST_DEPTH,
    SUFFIXES,
    LoadResult,
    folder_files,
    load_file,
    load_folder,
    load_text,
)
from agent.model.validation import (
    dns1123_label_problem,
    dns1123_subdomain_problem,
    label_key_problem,
    label_value_problem,
    port_name_problem,
)

__all__ = [
    "API_VERSIONS",
    "CLUSTER_SCOPED",
    "MAX_FAST_NESTING",
    "MAX_FILE_BYTES",
    "MAX_ITEMS_PER_OBJECT",
    "MAX_ITEMS_PER_TEXT",
    "MAX_LIST_DEPTH",
    "SUFFIXES",
    "LoadResult",
    "ParseMemo",
    "dns1123_label_problem",
    "dns1123_subdomain_problem",
    "folder_files",
    "label_key_problem",
    "label_value_problem",
    "load_file",
    "load_folder",
    "load_text",
    "parse_object",
    "port_name_problem",
]
