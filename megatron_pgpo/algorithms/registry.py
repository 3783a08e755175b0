"""Name -> function registries for advantage shapers and policy losses.

Everything downstream (trainer, demo, benchmarks) looks algorithms up by the name given in the config, so a new
shaper or loss is one decorated function and nothing else::

    from megatron_pgpo.algorithms.registry import ADVANTAGE_SHAPERS

    @ADVANTAGE_SHAPERS.register("my_shaper")
    def my_shaper(seq_advantages, response_mask, *, scores=None, **params): ...

Registering a name twice raises (two modules silently fighting over a name is a bug); looking up an unknown
name raises a ``KeyError`` whose message lists every valid name.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """A named collection of callables, filled by the ``register`` decorator.

    Args:
        kind: what the entries are, used in error messages ("advantage shaper", "policy loss").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under ``name``; a second registration of the name raises."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            if name in self._entries and self._entries[name] is not fn:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name].__module__}."
                    f"{self._entries[name].__qualname__}); pick another name"
                )
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        """The function registered as ``name``; ``KeyError`` listing the valid names if there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def names(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


#: Advantage shapers: ``fn(seq_advantages[B], response_mask[B, T], *, scores=None, **params) -> [B, T]``.
#: A shaper that reads ``scores`` names the view they compare the image with: ``fn.second_view = "text_only"``
#: (PGPO) or ``"masked_image"`` (VPPO); without one the trainer runs no second view. ``fn.whole_batch = True``:
#: called once on the rank's whole rollout share (padded), not per micro-batch.
ADVANTAGE_SHAPERS = Registry("advantage shaper")

#: Policy losses: ``fn(logp[B, T], old_logp[B, T], advantages[B, T], response_mask[B, T], **params)
#: -> (loss scalar, metrics dict)``.
POLICY_LOSSES = Registry("policy loss")


def second_view(*fns: Callable) -> "str | None":
    """The second view of the scoring pass that the given shaper / loss need (``fn.second_view``), or None;
    raises ``ValueError`` when they need different ones."""
    views = {getattr(fn, "second_view", None) for fn in fns} - {None}
    if len(views) > 1:
        raise ValueError(f"these algorithms need different second views of the image ({', '.join(sorted(views))}); "
                         "the scoring pass runs one")
    return views.pop() if views else None
