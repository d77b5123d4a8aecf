"""The Kubernetes runtime: Models become Pods through the API server, one module per concern."""
