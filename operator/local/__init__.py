"""The local runtime: Models become model-server processes on this machine (`kvgate up`)."""
