"""Run the agent from its folder: ``python3 path/to/agent --bundle DIR ...`` (or ``python -m deploy.agent`` here).

Run as a folder, Python puts the folder itself on sys.path and runs this file as a top-level script, so
the folder is loaded as the package ``redistill_agent`` (whatever the folder is called) for its modules'
relative imports, and taken off sys.path so that none of its module names shadow an installed module.
"""

import importlib.util
import os
import sys

PACKAGE = "redistill_agent"


def load_package(folder):
    """Import ``folder`` as the package ``redistill_agent`` and return it."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    return pkg


if __name__ == "__main__":
    if __package__:
        from .cli import run
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        if sys.path and os.path.abspath(sys.path[0] or os.curdir) == here:
            del sys.path[0]
        load_package(here)
        run = importlib.import_module(PACKAGE + ".cli").run
    sys.exit(run())
