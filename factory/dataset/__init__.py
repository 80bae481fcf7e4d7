"""The output format: a dataset's samples (`sample`), its files and records (`layout`, `writers`),
and reading, versioning and validating it (`read`, `versions`, `validate`)."""
