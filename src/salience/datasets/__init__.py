"""Real datasets used by Salience's zoo models, evaluations and benchmarks."""
