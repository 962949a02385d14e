"""RequestRoute: an endpoint that takes the Request and returns a Response, served without FastAPI's
parameter machinery, still documented, answered and error-handled as any route."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import SecurityScopes
from fastapi.testclient import TestClient
from pydantic import BaseModel

from imgsearch.gateway.request_route import RequestRoute, request_route


class Teapot(Exception):
    pass


class Answer(BaseModel):
    value: int


def app_with(router: APIRouter) -> FastAPI:
    app = FastAPI(routes=router.routes)

    @app.exception_handler(Teapot)
    async def teapot(request: Request, exc: Teapot) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=418)

    return app


def test_served_documented_and_its_errors_handled():
    router = APIRouter()

    @request_route(router, "/things/{n}", methods=["GET"], response_model=Answer, summary="a thing")
    async def thing(request: Request) -> JSONResponse:
        n = int(request.path_params["n"])
        if n == 418:
            raise Teapot("short and stout")
        if n == 500:
            return {"value": n}  # not a Response
        return JSONResponse({"value": n * int(request.query_params.get("times", "1"))})

    route = router.routes[0]
    assert isinstance(route, RequestRoute) and route.app == route._serve  # not FastAPI's handler
    client = TestClient(app_with(router), raise_server_exceptions=False)
    assert client.get("/things/7", params={"times": 3}).json() == {"value": 21}
    teapot = client.get("/things/418")
    assert (teapot.status_code, teapot.json()) == (418, {"error": "short and stout"})
    assert client.get("/things/500").status_code == 500  # FastAPI's handler would have answered 200
    refused = client.post("/things/7")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"
    op = client.get("/openapi.json").json()["paths"]["/things/{n}"]["get"]
    assert op["summary"] == "a thing"
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Answer"}


async def _with_a_dependency(request: Request, value: int = Depends(lambda: 1)) -> JSONResponse: ...


async def _without_the_request() -> JSONResponse: ...


def _synchronous(request: Request) -> JSONResponse: ...


async def _with_a_query_parameter(request: Request, n: int = 1) -> JSONResponse: ...


async def _with_a_header(request: Request, x_token: str = Header("")) -> JSONResponse: ...


async def _with_a_body(request: Request, answer: Answer) -> JSONResponse: ...


async def _with_the_response(request: Request, response: Response) -> JSONResponse: ...


async def _with_background_tasks(request: Request, tasks: BackgroundTasks) -> JSONResponse: ...


async def _with_security_scopes(request: Request, scopes: SecurityScopes) -> JSONResponse: ...


async def _with_the_request_by_keyword_only(*, request: Request) -> JSONResponse: ...


async def _with_the_request_twice(request: Request, again: Request) -> JSONResponse: ...


@pytest.mark.parametrize("endpoint", [_with_a_dependency, _without_the_request, _synchronous, _with_a_query_parameter,
                                      _with_a_header, _with_a_body, _with_the_response, _with_background_tasks,
                                      _with_security_scopes, _with_the_request_by_keyword_only,
                                      _with_the_request_twice])
def test_an_endpoint_with_anything_for_fastapi_to_solve_is_refused_at_definition(endpoint):
    with pytest.raises(TypeError, match="RequestRoute endpoint is `async def f"):
        request_route(APIRouter(), "/x", methods=["GET"])(endpoint)


def test_a_route_dependency_is_refused_too():
    async def endpoint(request: Request) -> JSONResponse: ...

    with pytest.raises(TypeError, match="without parameters or dependencies"):
        request_route(APIRouter(), "/x", methods=["GET"], dependencies=[Depends(lambda: 1)])(endpoint)


def test_the_gateway_serves_its_two_searches_so():
    from imgsearch.gateway.routes import router

    served = {(r.path, *sorted(r.methods)) for r in router.routes if isinstance(r, RequestRoute)}
    assert served == {("/v1/search", "POST"), ("/v1/images/{id}/similar", "GET")}
