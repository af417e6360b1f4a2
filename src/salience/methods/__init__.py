"""Attribution methods. Importing this package registers the built-in ones (see core.registry):
every module of the package is imported, so a new method file registers itself."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
