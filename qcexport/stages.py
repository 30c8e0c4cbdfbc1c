"""The one stage runner of convert, quantize and bundle: timing, progress, the failing stage.

    stages = StageRunner(on_stage)
    model = stages("simplify", simplify, model, base_dir)
    stages.timings  # {"simplify": 0.42, ...}

A stage that ends reports ``on_stage(name, seconds, detail)``; a stage run twice reports
(and records) its total. A ``UserError`` raised inside a stage that names no stage is given
the stage's name, so the CLI prints ``error: <stage>: ...``. Nothing here prints or imports
torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qcrun.errors import UserError

#: ``on_stage(stage name, seconds so far, detail)``: progress for a CLI or a notebook.
StageCallback = Callable[[str, float, str], None]


@dataclass
class StageRunner:
    """Runs stages one after another, recording how long each took."""

    on_stage: StageCallback | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any,
                 detail: Callable[[Any], str] | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as stage ``name``; ``detail(result)`` is shown beside its
        time."""
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except UserError as exc:
            exc.stage = exc.stage or name
            raise
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        if self.on_stage:
            self.on_stage(name, self.timings[name], detail(result) if detail else "")
        return result
