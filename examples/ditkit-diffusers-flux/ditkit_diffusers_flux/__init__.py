"""A ditkit plugin for diffusers ' Flux transformer: no model code, only a declaration and a sampling loop."""
