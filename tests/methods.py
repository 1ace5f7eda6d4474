"""The methods under test: one config factory each, so every life-cycle test runs over the whole family."""

from __future__ import annotations

from collections.abc import Callable

import lorta

METHODS: dict[str, Callable[..., object]] = {
    "lorta": lambda **kw: lorta.LortaConfig(**{"r": 3, "lora_alpha": 6, **kw}),
    "lorta-heads": lambda **kw: lorta.LortaConfig(**{"r": 3, "lora_alpha": 6, "modes": ["heads"], **kw}),
}
