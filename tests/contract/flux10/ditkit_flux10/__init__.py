"""A diffusers-Flux ditkit plugin as a third party wrote it against plugin contract 1.0 (ditkit 0.1.0)."""
