"""A `claudeflare serve` worker: `python -m claudeflare.worker ARGS` is `mitmdump ARGS` whose
listening socket is shared with the other workers on the same port (SO_REUSEPORT,
`hardening.share_listening_port`), applied here because mitmdump listens before it loads the addon script."""

import sys

from mitmproxy.tools.main import mitmdump

from .hardening import share_listening_port

if __name__ == "__main__":
    share_listening_port()
    sys.exit(mitmdump(sys.argv[1:]))
