"""Artifact store, manifests, stage keys and MLflow glue: where stage outputs live."""
