"""Model-independent core: the Explanation result, targets, the method registry and batching."""
