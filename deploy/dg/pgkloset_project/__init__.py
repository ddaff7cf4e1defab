"""A dg project wrapping PgKlosetComponent (see defs/pgkloset/defs.yaml)."""
