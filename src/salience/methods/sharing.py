"""Several inputs explained in shared model calls.

``explain()`` hands a list of inputs to a method's ``attribute_many`` in groups (see
:func:`salience.api.explain`). For methods whose rows of one input are independent of the other
inputs' (a gradient at the input, a layer's gradient, noisy copies), the rows of several images can
go through the model together, each read for its own image's target (the adapter's ``paired``
scoring), so N images cost the model calls of one batch of N rows instead of N calls of one row.

Which inputs can share: those whose adapter scores rows of any image of one grid together (it has a
``pixel_grid``: image classifiers), with one target each, grouped by grid. An input with several
targets, or alone on its grid, is explained by itself (its targets already share one forward pass).
A method that mixes in :class:`SharedInputs` writes :meth:`SharedInputs.attribute_together`; the
results equal those of ``attribute`` input by input, up to the rounding of batched arithmetic.
"""

from __future__ import annotations

from typing import Any

from salience.methods.base import Attribution, Context


def shares_calls(model: Any) -> bool:
    """Whether ``model`` scores rows of different inputs of one grid in one call (it has a pixel grid)."""
    return callable(getattr(model, "pixel_grid", None))


def share_groups(contexts: list[Context]) -> tuple[list[list[int]], list[int]]:
    """Indices of the contexts that share model calls, in groups of two or more (one target each,
    the same model and pixel grid, in their order), and the indices of those explained alone."""
    groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
    alone: list[int] = []
    for i, ctx in enumerate(contexts):
        if len(ctx.targets) == 1 and shares_calls(ctx.model):
            groups.setdefault((id(ctx.model), tuple(ctx.model.pixel_grid(ctx.encoded))), []).append(i)  # type: ignore[attr-defined]
        else:
            alone.append(i)
    shared = [members for members in groups.values() if len(members) > 1]
    alone += [members[0] for members in groups.values() if len(members) == 1]
    return shared, sorted(alone)


class SharedInputs:
    """Mixin for a method: ``attribute_many`` runs groups of contexts (see :func:`share_groups`)
    through :meth:`attribute_together` and the others through ``attribute``; ``shares_calls``
    tells ``explain()`` whether grouping inputs can save anything on this model (if not, each
    input is run, and its cost measured, by itself)."""

    def attribute(self, ctx: Context) -> Attribution:
        raise NotImplementedError

    def attribute_together(self, contexts: list[Context]) -> list[Attribution]:
        """One attribution per context (two or more, one target each, one grid) from shared model calls."""
        raise NotImplementedError

    def shares_calls(self, model: Any) -> bool:
        return shares_calls(model)

    def attribute_many(self, contexts: list[Context]) -> list[Attribution]:
        """One attribution per context, in order."""
        results: dict[int, Attribution] = {}
        groups, alone = share_groups(contexts)
        for members in groups:
            results.update(zip(members, self.attribute_together([contexts[i] for i in members]), strict=True))
        for i in alone:
            results[i] = self.attribute(contexts[i])
        return [results[i] for i in range(len(contexts))]
