"""Zoo models: small, reproducibly trained models shipped with Salience for examples and evaluations."""
