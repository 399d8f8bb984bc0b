"""Models: what the estimator knows of an architecture and where a spec comes from.

spec (the schema, the catalog, `resolve_model`), catalog_index (the catalog parsed at
build time), hf_config (a Hugging Face config.json as a spec), hub (a hub id's config).
"""
