"""Input pipelines: the procedural shapes world, tokenization and dataset builders."""
