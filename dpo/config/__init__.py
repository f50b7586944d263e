"""Configuration: the schema, typed settings and their range checks, validation of a composed config,
precision plans, secrets."""
