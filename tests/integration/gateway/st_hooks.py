"""schemathesis hooks for test_schema.py (loaded through SCHEMATHESIS_HOOKS=st_hooks).

Header values with control characters are refused by uvicorn's HTTP parser (400
"Invalid HTTP request") before the application sees them: that is the server's HTTP
layer, not the API under test, so such cases are not generated.
"""

import schemathesis


def _valid(value) -> bool:
    return isinstance(value, str) and all(c == "\t" or 32 <= ord(c) < 127 for c in value)


@schemathesis.hook
def filter_headers(context, headers):
    return headers is None or all(_valid(v) for v in headers.values())
