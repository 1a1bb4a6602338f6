"""Growing small data: augmentation methods (one registry), filters that keep the answer and keep
validation/test data out, and the `fewtune augment` pipeline (provenance, rejects, summary)."""
