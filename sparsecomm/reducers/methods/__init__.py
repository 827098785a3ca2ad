"""One module per method family; every module in this package is imported, which registers
its methods (a new family is a new file, nothing else to edit)."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
