"""Sources: one module per source, each turning its raw inputs into records."""
