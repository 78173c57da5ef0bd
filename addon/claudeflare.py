"""mitmproxy entry point: `mitmdump -s addon/claudeflare.py`.

The logic lives in the `claudeflare` package. mitmproxy puts this script's folder first on
sys.path, where this very file would shadow the package of the same name, so take it off first.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
if str(_here.parent) not in sys.path:
    sys.path.append(str(_here.parent))  # a checkout run without `pip install -e .`

from claudeflare import limits, proxy  # noqa: E402

# Fresh instances on every (re)load of this script; connection limits last, so that they see any
# refusal made in `requestheaders`.
addons = [*proxy.addons(), limits.ConnectionLimits()]
