"""Attribution methods. Importing this package registers the built-in ones (see core.registry)."""

from salience.methods import attention, gradient, integrated_gradients, perturbation, sig  # noqa: F401
