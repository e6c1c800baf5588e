"""Little models: what each declares to the engine, the drafts built from a big model (`recipe`, `heads`), feature
drafts (`feature`), and the trained drafts shipped as data (`<alias>/`).

The protocol: a little model declares what it needs from the big model beside it as `bild_little`, a LittleSpec
(class or instance attribute); a model without one is a plain language model that runs on its own. The runners
read the declaration; nothing probes a model's type or attributes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True, slots=True)
class LittleSpec:
    """What a little model needs from the big model it runs beside."""
    reads_big_features: bool = False  # reads the big model's final hidden states (EAGLE): cannot decode alone
    exit_of: weakref.ref | None = None  # an early exit of this big module: on the native engine it shares its runner
    exit_layers: int = 0  # ... after this many of its layers

    def exits(self, big: nn.Module | None) -> bool:
        """Whether this little model is an early exit of `big` (a live module, compared by identity)."""
        return self.exit_of is not None and big is not None and self.exit_of() is big


PLAIN = LittleSpec()


def early_exit_spec(big: nn.Module, n_layers: int) -> LittleSpec:
    return LittleSpec(exit_of=weakref.ref(big), exit_layers=n_layers)


def spec_of(little: nn.Module) -> LittleSpec:
    """The little model's declaration, or PLAIN for a model that declares nothing."""
    spec = getattr(little, "bild_little", PLAIN)
    if not isinstance(spec, LittleSpec):
        raise TypeError(f"bild_little of {type(little).__name__} must be a LittleSpec, not {type(spec).__name__}")
    return spec
