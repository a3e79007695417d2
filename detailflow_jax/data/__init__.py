"""Input pipelines (Grain): image sources, token records, procedural shapes, degradation."""
