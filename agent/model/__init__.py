"""Kubernetes objects in, validated: Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy and Node.

`agent.model.objects` holds the immutable types, `agent.model.load` reads them from YAML/JSON the
way the API server validates them, `agent.model.errors` names a rejected object and field.
Nothing here imports any other part of podfence.
"""

from agent.model.errors import ModelError, PolicyError
from agent.model.load import LoadResult, load_file, load_folder, load_text, parse_object

__all__ = ["LoadResult", "ModelError", "PolicyError", "load_file", "load_folder", "load_text", "parse_object"]
