"""Kubernetes objects in, validated: Namespace, Pod and networking.k8s.io/v1 NetworkPolicy.

Nothing here imports any other part of podfence.
"""
