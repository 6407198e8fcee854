"""The model registry: versions and lineage, promotion by alias and its gates, export, and the model card."""
