"""catdog-serve: the HTTP inference service."""
