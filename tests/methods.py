"""The methods under test: one config factory each, so every life-cycle test runs over the whole family."""

from __future__ import annotations

from collections.abc import Callable

import lorta

METHODS: dict[str, Callable[..., object]] = {
    "lorta": lambda **kw: lorta.LortaConfig(**{"r": 3, "lora_alpha": 6, **kw}),
    "lorta-heads": lambda **kw: lorta.LortaConfig(**{"r": 3, "lora_alpha": 6, "modes": ["heads"], **kw}),
    "tenslora-tucker": lambda **kw: lorta.TensLoraConfig(**{"ranks": [3, 3, 2, 2, 2], "lora_alpha": 6, **kw}),
    "tenslora-cp-qkv": lambda **kw: lorta.TensLoraConfig(
        **{"construction": "qkv", "decomposition": "cp", "ranks": 3, "lora_alpha": 6, **kw}
    ),
    "tlora": lambda **kw: lorta.TLoraConfig(**{"r": 3, "lora_alpha": 6, **kw}),
    "tlora-seed-only": lambda **kw: lorta.TLoraConfig(**{"r": 3, "lora_alpha": 6, "save_projection": False, **kw}),
}
