"""The HTTP edge: `blip2-search serve` (an ASGI app over one open `Library`) and its web page.

Modules: `app` (routes, error mapping, `serve`), `security` (bind rule, token, request guard),
`photos` (which files may be served, thumbnail cache), `runner` (model calls one at a time, the rest
in worker threads), `limits` (request limits and parameter parsing), `schemas` (OpenAPI shapes),
`static/` (the page: plain HTML, CSS and JS, no build step).
"""

from .app import bind_socket, create_app, serve
from .security import check_bind

__all__ = ["bind_socket", "check_bind", "create_app", "serve"]
