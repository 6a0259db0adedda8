"""Method zoo. Every module here defines one method family and registers its spec; importing this
package imports them all, so adding a method is adding one file (see docs/adding-a-method.md)."""

from __future__ import annotations

import importlib
import pkgutil

from ..core.spec import registered_methods

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

#: public spec classes by class name, e.g. ``LoRA`` (filled from the registry, not by hand)
SPECS = {cls.__name__: cls for cls in registered_methods().values()}
globals().update(SPECS)
__all__ = sorted(SPECS)
