"""mitmproxy entry point: `mitmdump -s addon/claudeflare.py`.

The logic lives in the `claudeflare` package. mitmproxy puts this script's folder first on
sys.path, where this very file would shadow the package of the same name, so take it off first.
`claudeflare serve` runs it as `claudeflare/entry/claudeflare.py`, a link here (a copy in a wheel).
"""

import sys
from pathlib import Path

# This folder, as mitmproxy put it there: addon/, or claudeflare/entry/ holding a link to this file.
_here = {Path(__file__).parent.resolve(), Path(__file__).resolve().parent}
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in _here]
_root = Path(__file__).resolve().parent.parent
if (_root / "claudeflare" / "__init__.py").exists() and str(_root) not in sys.path:
    sys.path.append(str(_root))  # a checkout run without `pip install -e .` (not a wheel's copy)

from claudeflare import proxy  # noqa: E402

addons = proxy.addons()  # fresh instances on every (re)load of this script
