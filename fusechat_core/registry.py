"""Name → implementation registries, filled by decorators.

Merge methods, fusion functions and data-source loaders each live in a small
file of their own and register themselves; the code that uses them knows
only names. Importing the package that holds them fills the registry.

Each entry has a version, 1 when first registered, bumped by hand when the entry's
code changes what it produces (``register(name, version=2)``). Addresses carry the
versions of the entries a stage uses (``versions``), so a changed loader, cleaner,
domain, aligner or merge method moves only the artifacts made with it; a change to
the engine itself is a stage's version (``stages.STAGE_VERSIONS``), which moves all.
Only registries created with ``addressed=True`` take versions: those whose entries
the plan can name without importing the heavy stack (a rerun that finds everything
done imports no torch) and knows before anything is loaded. The others refuse one
(fusion functions: naming them imports torch; chat templates: a model without one
uses its tokenizer's own): a change there is a stage's version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, addressed: bool = False):
        self.kind = kind
        self.addressed = addressed
        self._items: dict[str, T] = {}
        self._versions: dict[str, int] = {}

    def register(self, name: str, *, version: int = 1) -> Callable[[T], T]:
        if version < 1:
            raise ValueError(f"{self.kind} {name!r}: version {version} (versions start at 1)")
        if version != 1 and not self.addressed:
            raise ValueError(f"{self.kind} {name!r}: a {self.kind}'s version enters no address; "
                             "bump the stage's version (stages.STAGE_VERSIONS)")

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._versions[name] = version
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def version(self, name: str) -> int:
        self.get(name)  # an unknown name fails as ``get`` does
        return self._versions[name]

    def versions(self, names: Iterable[str]) -> dict[str, int]:
        """``{name: version}`` of those of ``names`` past their first version: what an address
        carries. First versions are left out, so registering a version moves no address that
        was derived before versions existed; names not registered are left to the code that
        uses them to report (a config check, with the known names)."""
        return {n: self._versions[n] for n in sorted(set(names)) if self._versions.get(n, 1) > 1}

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
