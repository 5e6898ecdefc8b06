"""The OpenAPI document describes exactly the routes the app serves.

(That every status and body the other web tests see is documented is checked by the
``serve`` fixture on each answer.)
"""

from __future__ import annotations

from openapi_spec_validator import validate
from test_web_support import Client

from service.settings import Settings
from service.web.app import create_app
from service.web.openapi import DOCUMENT
from service.web.pages import is_page

pytest_plugins = ["test_web_support"]


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    """Every route of the JSON API; the HTML pages (/ and /ui/...) are left out."""
    app = create_app(Settings())
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if not is_page(route.resource.canonical)
    }
    documented = {
        (method.upper(), path)
        for path, operations in DOCUMENT["paths"].items()
        for method in operations
    }
    assert served == documented


def test_operations_needing_the_token_say_so() -> None:
    open_paths = {"/healthz", "/readyz", "/metrics"}
    for path, operations in DOCUMENT["paths"].items():
        for operation in operations.values():
            assert (operation["security"] == []) == (path in open_paths), path
            assert ("401" in operation["responses"]) == (path not in open_paths), path


async def test_the_served_document_is_this_one(client: Client) -> None:
    async with client.get("/openapi.json") as response:
        assert await response.json() == DOCUMENT
