"""Routes whose endpoint reads the request itself and returns its own response.

FastAPI serves every route through its parameter machinery: two exit stacks, the dependency
solver, telemetry hooks and the response checks, at every request. The two search routes take
only the :class:`~starlette.requests.Request` (they parse their values themselves) and return a
finished :class:`~starlette.responses.Response`, so for them that machinery does nothing, yet it
is about a fifth of a ``similar``'s CPU (docs/deploy.md, Gateway requests per second per core).
:class:`RequestRoute` keeps everything FastAPI knows of the route (the OpenAPI schema, its
response model, methods, 405) and calls the endpoint directly. An exception it raises reaches
the app's handlers through Starlette's ``ExceptionMiddleware``, as from any route.

Two limits. A router added with ``include_router`` is served through FastAPI's handler again
(FastAPI rebuilds it for included routes): still correct, without the saving; the app takes
these routes with ``FastAPI(routes=...)``. With an OpenTelemetry provider configured, FastAPI's
span for such a request names the route (the router sets it) but has no ``fastapi.dependencies``
or ``fastapi.endpoint`` child spans, and its hooks see no request or solved values.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Endpoint = TypeVar("Endpoint", bound=Callable[[Request], Awaitable[Response]])


class RequestRoute(APIRoute):
    """An :class:`APIRoute` for ``async def endpoint(request: Request) -> Response`` and nothing more."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        d = self.dependant
        takes_more = (d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params
                      or d.dependencies or self.dependencies or d.response_param_name
                      or d.background_tasks_param_name or d.http_connection_param_name
                      or d.security_scopes_param_name or d.websocket_param_name)
        params = list(inspect.signature(endpoint).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        one_request = len(params) == 1 and params[0].kind in positional and d.request_param_name is not None
        if not inspect.iscoroutinefunction(endpoint) or not one_request or takes_more:
            raise TypeError(f"{self.name}: a RequestRoute endpoint is `async def f(request: Request) -> Response`, "
                            "without parameters or dependencies for FastAPI to solve")
        self.app = self._serve

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive, send))
        if not isinstance(response, Response):
            raise TypeError(f"{self.name} returned {type(response).__name__}, not a Response")
        await response(scope, receive, send)


def request_route(router: APIRouter, path: str, *, methods: list[str],
                  **kwargs: Any) -> Callable[[Endpoint], Endpoint]:
    """``@request_route(router, path, methods=[...], ...)``: as ``@router.get`` / ``@router.post``, served
    as a :class:`RequestRoute` (keyword arguments as ``APIRouter.add_api_route``'s)."""
    def add(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(path, endpoint, methods=methods, route_class_override=RequestRoute, **kwargs)
        return endpoint
    return add
