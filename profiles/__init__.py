"""Run profiles: YAML files in this folder, validated by pydantic (see schema.py, loader.py)."""
from profiles.loader import available_profiles, load_profile

__all__ = ["available_profiles", "load_profile"]
