"""Everything that creates jobs: the CLI, manifests, submission, the reconciler."""
