"""The result of patching: scores of model components (not of input features), with a JSON form, a
terminal heatmap (rich) and a PNG heatmap (matplotlib, Agg)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from salience.errors import ParameterError

FORMAT = "salience.patching/1"


@dataclass
class PatchingResult:
    """Scores in units of the metric (see :mod:`salience.patching.run`): ``residual`` (layers,
    positions), the residual stream after each layer at each position of the clean input;
    ``heads`` (layers, heads), each attention head's output patched at every position. None for a
    kind not asked for. ``clean_metric`` / ``corrupted_metric``: m on each input unpatched.
    ``cost``: rows through the model (forward, backward), model calls and seconds."""

    method: str
    model: str
    metric: str
    scale: float
    clean_metric: float
    corrupted_metric: float
    tokens: list[str]
    corrupted_tokens: list[str]
    layers: list[str]
    residual: np.ndarray | None
    heads: np.ndarray | None
    cost: dict[str, float] = field(default_factory=dict)
    method_note: str = ""

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["residual"] = None if self.residual is None else self.residual.tolist()
        data["heads"] = None if self.heads is None else self.heads.tolist()
        return {"format": FORMAT, **data}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchingResult:
        if data.get("format") != FORMAT:
            raise ParameterError(f"not a patching result (format {data.get('format')!r}, expected {FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        for kind in ("residual", "heads"):
            fields[kind] = None if fields.get(kind) is None else np.asarray(fields[kind], dtype=np.float64)
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> PatchingResult:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ views
    def grid(self, kind: str | None = None) -> tuple[str, np.ndarray, list[str]]:
        """(kind, scores (layers, columns), column labels) of ``kind`` ("residual" or "heads"; the first
        present when None). A residual column is labelled with its clean token, "clean→corrupted"
        where the two inputs differ."""
        present = [k for k in ("residual", "heads") if getattr(self, k) is not None]
        chosen = kind or (present[0] if present else None)
        if chosen not in present:
            raise ParameterError(f"this result has no {chosen!r} scores; it has {', '.join(present) or 'none'}")
        values = getattr(self, chosen)
        if chosen == "heads":
            return chosen, values, [f"h{h}" for h in range(values.shape[1])]
        return chosen, values, [a if a == b else f"{a}→{b}" for a, b in zip(self.tokens, self.corrupted_tokens)]

    def top(self, k: int = 5, kind: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` components with the largest |score|: ("layer L, token 'x' (p)" or "layer L head h", score)."""
        chosen, values, labels = self.grid(kind)
        order = np.argsort(-np.abs(values), axis=None)[:k]
        what = "token" if chosen == "residual" else ""
        return [(f"layer {i} {what} {labels[j]!r} ({j})".replace("  ", " ") if chosen == "residual" else f"layer {i} head {j}",
                 float(values[i, j])) for i, j in (np.unravel_index(o, values.shape) for o in order)]

    def table(self, kind: str | None = None) -> Table:
        """A rich table: one row per layer, one column per position (or head), cells coloured green
        (patching raises the metric) or red (lowers it), strength |score| / max |score|."""
        chosen, values, labels = self.grid(kind)
        largest = float(np.abs(values).max()) or 1.0
        table = Table(title=f"{self.method} {chosen}: change in {self.metric} (clean {self.clean_metric:+.3f}, "
                            f"corrupted {self.corrupted_metric:+.3f})", caption=self.method_note, show_lines=False)
        table.add_column("layer", justify="right")
        for label in labels:
            table.add_column(label.replace(" ", "␣")[:16], justify="right")
        for layer, row in enumerate(values):
            table.add_row(str(layer), *(Text(f"{v:+.2f}", style=_style(v, largest)) for v in row))
        return table

    def __rich__(self) -> Table:
        return self.table()

    def show(self) -> None:
        """Print one table per component kind present to the terminal."""
        console = Console()
        for kind in ("residual", "heads"):
            if getattr(self, kind) is not None:
                console.print(self.table(kind))

    def to_text(self, kind: str | None = None, width: int = 160) -> str:
        """The terminal heatmap as plain text (no colour)."""
        console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
        console.print(self.table(kind))
        return console.export_text()

    def to_png(self, path: str | Path, kind: str | None = None) -> str:
        """A heatmap (layers x positions or heads), diverging colours centred at 0, saved to ``path``."""
        from matplotlib.figure import Figure

        chosen, values, labels = self.grid(kind)
        largest = float(np.abs(values).max()) or 1.0
        figure = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2), max(3.0, 0.3 * len(values) + 1.5)), dpi=110)
        axis = figure.subplots()
        image = axis.imshow(values, cmap="RdBu_r", vmin=-largest, vmax=largest, aspect="auto")
        axis.set_xticks(range(len(labels)), labels, rotation=90)
        axis.set_ylabel("layer")
        axis.set_title(f"{self.method} {chosen}: change in {self.metric}", fontsize=9)
        figure.colorbar(image, ax=axis, label="metric change (red: raises it)")
        figure.tight_layout()
        figure.savefig(path)
        return str(path)


def _style(score: float, largest: float) -> str:
    level = int(40 + 180 * min(1.0, abs(score) / largest))
    return f"black on rgb({255 - level},255,{255 - level})" if score > 0 else f"black on rgb(255,{255 - level},{255 - level})"
