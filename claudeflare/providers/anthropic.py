"""`anthropic`: Anthropic's own API, with a subscription's OAuth token or an API key (as before #16)."""

from . import Provider


class Anthropic(Provider):
    name = "anthropic"

    def authenticate(self, headers, account, credential, request) -> None:
        from ..flows import inject_credential  # flows imports accounts, which imports the providers

        inject_credential(headers, account, credential)
