"""Everything that runs jobs: the model layer, the embedding cache, the job runner."""
