"""Model assets shipped with dera-local (installed as dera_local.bundled_models)."""
